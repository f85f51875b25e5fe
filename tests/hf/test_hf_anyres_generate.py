"""Generation with an anyres LLaVA-NeXT model: lvm's greedy tokens equal transformers' `generate`.

A tiny random `LlavaNextForConditionalGeneration` (float32, sharp logits so float noise cannot
flip an argmax) saved offline; lvm loads it with `lvm.hf.load`, preprocesses the same PIL
images with `lvm.inference.load_image` and generates one batch of rows with images of
different aspect ratios, a text-only row and a two-image row, on the 8 emulated devices of
tests/conftest.py (so the batch is padded to 8 rows and the tower's tile budget is split in 8
groups, one per shard); transformers generates each row alone from its own processor's
pixels.
"""

import jax
import numpy as np
import pytest
import torch

import hf_fixtures as F
import lvm.hf
import lvm.models
import test_hf_anyres as A
from lvm import anyres_inputs
from lvm import config as lvm_config
from lvm import inference
from lvm.generate import Generator

NEW = 8
# Rows of image sizes (height, width): wide, text only, tall + panorama, tiny, square.
ROWS = [[(40, 90)], [], [(90, 40), (20, 300)], [(3, 5)], [(64, 64)]]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  model = A.next_model(seed=3)
  with torch.no_grad():
    model.lm_head.weight.mul_(50)
  folder = str(tmp_path_factory.mktemp('next_generate'))
  model.save_pretrained(folder)
  model_config, params = lvm.hf.load(folder)
  config = lvm_config.get_config()
  config.model = model_config
  config.data.image_mean, config.data.image_std = A.CLIP_MEAN, A.CLIP_STD
  rng = np.random.default_rng(0)
  pil = [[A._image(h, w, seed=10 * r + i) for i, (h, w) in enumerate(row)]
         for r, row in enumerate(ROWS)]
  images = [[inference.load_image(config, im) for im in row] or None for row in pil]
  prompts = []
  for row in images:
    ids = [1] + [F.IMAGE_TOKEN, 13] * len(row or []) + rng.integers(3, 400, 5).tolist()
    counts = [lvm.models.num_image_tokens(model_config, image_size=im.size) for im in row or []]
    prompts.append(anyres_inputs.expand_image_tokens(ids, counts, F.IMAGE_TOKEN))
  return dict(model=model, config=config, params=params, pil=pil, images=images,
              prompts=prompts)


def _transformers_greedy(model, prompt, pil):
  kw = {}
  if pil:
    processed = A._processor('next')(pil, return_tensors='pt')
    kw = dict(pixel_values=processed['pixel_values'], image_sizes=processed['image_sizes'])
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0,
                         suppress_tokens=[F.IMAGE_TOKEN], **kw)
  return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(setup):
  s = setup
  gen = Generator(s['config'], s['params'], bucket_tiles=True)
  outs = gen.generate(s['prompts'], s['images'], max_new_tokens=NEW)
  for r, (prompt, pil, out) in enumerate(zip(s['prompts'], s['pil'], outs)):
    assert out.tokens == _transformers_greedy(s['model'], prompt, pil), f'row {r}'
  assert gen.num_compiles == 1
  # Bucketed: the tower ran on each shard's real tiles rounded up to a power of two (the
  # two-image row's 3 + 4 -> 8, times 8 shards of one row), not on all 8 x 2 x 5 slots.
  assert gen.batch_multiple == 8
  _, _, budget = anyres_inputs.tile_batch(s['images'], len(ROWS), 8, gen.anyres, 5, True,
                                          groups=8)
  assert budget == 64


def test_bucketed_and_padded_tiles_give_the_same_logits(setup):
  s = setup
  config = s['config']
  lay = lvm.models.anyres_model.layout(config.model)
  length = max(map(len, s['prompts']))
  ids = np.zeros((len(ROWS), length), np.int32)
  for r, p in enumerate(s['prompts']):
    ids[r, :len(p)] = p
  model = lvm.models.build(config)
  padded = anyres_inputs.tile_batch(s['images'], len(ROWS), len(ROWS), lay, 5, False)
  bucketed = anyres_inputs.tile_batch(s['images'], len(ROWS), len(ROWS), lay, 5, True)
  assert padded[2] is None and bucketed[2] == 32 and padded[0].shape[:3] == (5, 2, 5)

  @jax.jit
  def both(params, padded_tiles, bucketed_tiles, sizes):  # one program: one compile
    return [model.apply({'params': params}, tiles, ids, image_sizes=sizes, tile_budget=budget)
            for tiles, budget in ((padded_tiles, None), (bucketed_tiles, bucketed[2]))]

  full, skipped = both(s['params'], padded[0], bucketed[0], padded[1])
  np.testing.assert_allclose(np.asarray(skipped), np.asarray(full), rtol=1e-5, atol=1e-5)
  # Eagerly, a budget below the real tiles is refused.
  tiles, sizes, _ = anyres_inputs.tile_batch(s['images'], len(ROWS), len(ROWS), lay, 5, True)
  with pytest.raises(ValueError, match='20 real tiles .* exceed tile_budget'):
    model.apply({'params': s['params']}, tiles, ids, image_sizes=sizes, tile_budget=8)


def test_bad_anyres_inputs_fail_before_compiling(setup):
  s = setup
  gen = Generator(s['config'], s['params'])
  prompt, image = s['prompts'][0], s['images'][0]
  with pytest.raises(ValueError, match=r'Row 0: image 0 \(size \(40, 90\)\) needs'):
    gen.generate([prompt[:3] + prompt[4:]], [image], max_new_tokens=2)  # one token short
  with pytest.raises(ValueError, match='Row 0, image 0: an anyres model takes AnyresImage'):
    gen.generate([prompt], [np.zeros((1, 32, 32, 3), np.float32)], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'has 4 tiles of \[32, 32, 3\], got \[5, 32, 32, 3\]'):
    wrong = anyres_inputs.AnyresImage(np.zeros((5, 32, 32, 3), np.float32), image[0].size)
    gen.generate([prompt], [[wrong]], max_new_tokens=2)
  assert gen.num_compiles == 0
