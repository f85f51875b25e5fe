"""LLaVA-NeXT and LLaVA-OneVision: lvm.hf.load / save vs transformers, the whole anyres path.

Tiny random models built offline (float32). lvm's pixels come from `lvm.data.anyres`, the
torch side's from transformers' own image processor on the same PIL images; token counts
from `lvm.models.num_image_tokens(config, image_size=...)` (transformers raises if they do
not match its features). Criterion: max |lvm - torch| / max |torch| < 1e-4.
OneVision is tested with a LLaMA text_config (Qwen2 is another branch's decoder family).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import hf_fixtures as F
import lvm.hf
import lvm.models
from lvm.data import anyres as data_anyres
from lvm.models import anyres_model

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEXT_PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
OV_PINS = [list(p) for p in data_anyres.onevision_pinpoints(32, 3)]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# Rows of image sizes (height, width): wide, tall, a 15:1 panorama, a tiny image, a square;
# a row without images; several images per row.
ROWS = [[(40, 90), (90, 40)], [], [(20, 300), (3, 5), (64, 64)], [(130, 70)]]


def _randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model.eval()


def next_model(seed=0):
  config = transformers.LlavaNextConfig(
      vision_config=F.vision_config('clip'), text_config=F.text_config(),
      image_token_index=F.IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINS,
      vision_feature_layer=-2, vision_feature_select_strategy='default')
  torch.manual_seed(seed)
  return _randomize(transformers.LlavaNextForConditionalGeneration(config), seed)


def onevision_model(seed=0, aspect='anyres_max_2'):
  config = transformers.LlavaOnevisionConfig(
      vision_config=F.vision_config('siglip'), text_config=F.text_config(),
      image_token_index=F.IMAGE_TOKEN, image_grid_pinpoints=OV_PINS,
      vision_aspect_ratio=aspect, vision_feature_layer=-1, vision_feature_select_strategy='full')
  torch.manual_seed(seed)
  return _randomize(transformers.LlavaOnevisionForConditionalGeneration(config), seed)


def _processor(kind):
  if kind == 'next':
    name, kw = 'LlavaNextImageProcessor', dict(
        size={'shortest_edge': F.IMAGE_SIZE}, image_grid_pinpoints=NEXT_PINS,
        crop_size={'height': F.IMAGE_SIZE, 'width': F.IMAGE_SIZE}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD)
  else:
    name, kw = 'LlavaOnevisionImageProcessor', dict(
        size={'height': F.IMAGE_SIZE, 'width': F.IMAGE_SIZE}, image_grid_pinpoints=OV_PINS,
        image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
  cls = getattr(transformers, name + 'Pil', None) or getattr(transformers, name)
  return cls(resample=3, **kw)


def _image(h, w, seed):
  rng = np.random.default_rng(seed + 7 * h + w)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def batch(kind, model_config, rows=ROWS, seq_len=300):
  """lvm inputs (tiles [B, N, T, S, S, 3], image_sizes, ids, mask) and torch inputs."""
  pins = model_config.anyres.pinpoints
  mean, std = (CLIP_MEAN, CLIP_STD) if kind == 'next' else (SIGLIP_MEAN, SIGLIP_STD)
  t = anyres_model.num_tiles(model_config)
  b, n = len(rows), max(len(r) for r in rows)
  tiles = np.zeros((b, n, t, F.IMAGE_SIZE, F.IMAGE_SIZE, 3), np.float32)
  sizes = np.zeros((b, n, 2), np.int32)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, F.IMAGE_TOKEN, size=(b, seq_len)).astype(np.int32)
  mask = np.ones((b, seq_len), bool)
  pil = []
  for r, row in enumerate(rows):
    start = 3
    for i, (h, w) in enumerate(row):
      im = _image(h, w, seed=r * 10 + i)
      pil.append(im)
      tiles[r, i] = data_anyres.pad_tiles(
          data_anyres.tiles(im, pins, F.IMAGE_SIZE, mean, std), t - 1)[0]
      sizes[r, i] = (h, w)
      k = lvm.models.num_image_tokens(model_config, image_size=(h, w))
      ids[r, start:start + k] = F.IMAGE_TOKEN
      start += k + 2
    assert start + 5 <= seq_len
  ids[1, -5:], mask[1, -5:] = 0, False  # right padding on the text-only row
  processed = _processor(kind)(pil, return_tensors='pt')
  torch_inputs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      pixel_values=processed['pixel_values'],
                      image_sizes=processed['image_sizes'])
  return dict(images=tiles, image_sizes=sizes, input_ids=ids, attention_mask=mask,
              torch=torch_inputs)


def lvm_logits(model_config, params, inputs, jit=True):
  model = lvm.models.build(model_config)
  apply = jax.jit(model.apply) if jit else model.apply
  return np.asarray(apply({'params': params}, inputs['images'], inputs['input_ids'],
                          inputs['attention_mask'], image_sizes=inputs['image_sizes']))


_cache = {}


def case(kind, tmp_path_factory):
  """(torch model, its folder, inputs, torch logits), once per session."""
  if kind not in _cache:
    model = next_model() if kind == 'next' else onevision_model()
    folder = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(folder)
    config, _ = lvm.hf.load(folder)
    inputs = batch(kind, config)
    _cache[kind] = (model, folder, inputs, F.torch_logits(model, inputs))
  return _cache[kind]


@pytest.mark.parametrize('kind', ['next', 'onevision'])
def test_logits_match_transformers(kind, tmp_path_factory):
  _, folder, inputs, ref = case(kind, tmp_path_factory)
  config, params = lvm.hf.load(folder)
  assert config.anyres.vision_aspect_ratio == ('anyres' if kind == 'next' else 'anyres_max_2')
  ours = lvm_logits(config, params, inputs)
  assert ours.shape == ref.shape
  err = F.rel_err(ours, ref, inputs['attention_mask'])
  assert err < TOL, f'{kind}: relative error {err:.2e}'
  # The image_newline and the images matter: a zero newline changes the logits.
  params['image_newline'] = np.zeros_like(params['image_newline'])
  assert F.rel_err(lvm_logits(config, params, inputs), ref, inputs['attention_mask']) > 1e-3


@pytest.mark.parametrize('kind', ['next', 'onevision'])
def test_export_loads_in_transformers_with_same_logits(kind, tmp_path_factory, tmp_path):
  model, folder, inputs, ref = case(kind, tmp_path_factory)
  config, params = lvm.hf.load(folder)
  lvm.hf.save(config, params, str(tmp_path))
  cls = type(model)
  reloaded = cls.from_pretrained(str(tmp_path)).eval()
  err = F.rel_err(F.torch_logits(reloaded, inputs), ref, inputs['attention_mask'])
  assert err < TOL, f'{kind} export: relative error {err:.2e}'


def test_unused_tiles_and_absent_images_change_nothing(tmp_path_factory):
  _, folder, inputs, _ = case('next', tmp_path_factory)
  config, params = lvm.hf.load(folder)
  base = lvm_logits(config, params, inputs)
  noisy = dict(inputs)
  images = inputs['images'].copy()
  rng = np.random.default_rng(1)
  for r in range(images.shape[0]):
    for i in range(images.shape[1]):
      h, w = inputs['image_sizes'][r, i]
      used = 0 if h == 0 else 1 + np.prod(data_anyres.grid_shape((h, w), NEXT_PINS, 32))
      images[r, i, used:] = rng.normal(size=images[r, i, used:].shape)
  noisy['images'] = images
  np.testing.assert_allclose(lvm_logits(config, params, noisy), base, rtol=1e-6, atol=1e-6)
  # Eager and jitted agree (the tables are traced in both).
  np.testing.assert_allclose(lvm_logits(config, params, inputs, jit=False), base, atol=2e-5)


def test_token_count_mismatch_names_row_and_image(tmp_path_factory):
  _, folder, inputs, _ = case('next', tmp_path_factory)
  config, params = lvm.hf.load(folder)
  ids = inputs['input_ids'].copy()
  first = int(np.argmax(ids[2] == F.IMAGE_TOKEN))
  ids[2, first] = 7  # one token short for row 2's first image
  model = lvm.models.build(config)
  with pytest.raises(ValueError, match=r'Row 2: image 0 \(size \(20, 300\)\) needs'):
    model.apply({'params': params}, inputs['images'], ids, image_sizes=inputs['image_sizes'])
  with pytest.raises(ValueError, match='image_size'):
    lvm.models.num_image_tokens(config)


def test_config_check_names_bad_pinpoints():
  from lvm import config as lvm_config  # pylint: disable=g-import-not-at-top
  from lvm import validate  # pylint: disable=g-import-not-at-top
  config = lvm_config.get_config()
  config.data.manual_dir, config.data.seq_len = '/tmp', 4096
  config.model.anyres.pinpoints = [[336, 672], [672, 672]]
  validate.validate_config(config, 1)  # a LLaVA-NeXT-shaped config passes
  config.model.anyres.pinpoints = [[336, 672], [500, 336]]
  config.model.anyres.vision_aspect_ratio = 'anyres_max_x'
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, 1)
  assert 'config.model.anyres.pinpoints: image_grid_pinpoints entry [500, 336]' in str(e.value)
  assert 'config.model.anyres.vision_aspect_ratio' in str(e.value)
  config.model.anyres.pinpoints, config.model.anyres.vision_aspect_ratio = [[672, 672]], 'anyres'
  config.model.anyres.max_tiles = 3
  with pytest.raises(ValueError, match=r'max_tiles: 3 is fewer than the 4 tiles'):
    validate.validate_config(config, 1)
  config.model.anyres.max_tiles, config.data.seq_len = 0, 2048  # a 2x2 image needs 2928
  with pytest.raises(ValueError, match=r'data.seq_len: 2048 .* 2928 tokens'):
    validate.validate_config(config, 1)


@pytest.mark.parametrize('scan', [True, False])
def test_random_params_of_an_anyres_model(scan, tmp_path_factory):
  _, folder, inputs, _ = case('onevision', tmp_path_factory)
  config, loaded = lvm.hf.load(folder, scan_layers=scan)
  params = jax.jit(lambda rng: lvm.models.random_params(
      config, rng, inputs['images'][:1, :1], np.ones((1, 8), np.int32),
      image_sizes=np.zeros((1, 1, 2), np.int32)))(jax.random.PRNGKey(0))
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(params) == shapes(loaded) and params['image_newline'].shape == (64,)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-m', 'lvm.hf', *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.parametrize('kind', ['next', 'onevision'])
def test_cli_import_then_export(kind, tmp_path_factory, tmp_path):
  model, folder, inputs, ref = case(kind, tmp_path_factory)
  _cli('import', folder, str(tmp_path / 'imported'))
  _cli('export', str(tmp_path / 'imported'), str(tmp_path / 'exported'))
  reloaded = type(model).from_pretrained(str(tmp_path / 'exported')).eval()
  err = F.rel_err(F.torch_logits(reloaded, inputs), ref, inputs['attention_mask'])
  assert err < TOL, f'{kind} CLI round trip: relative error {err:.2e}'
