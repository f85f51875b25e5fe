"""LLaVA-OneVision with a Qwen2 decoder (as the released OneVision checkpoints): lvm.hf.load
logits equal transformers' on a batch mixing image sizes, several images per row and a row
without images, and lvm's greedy generation equals transformers' `generate`.

A tiny random `LlavaOnevisionForConditionalGeneration` (SigLIP tower, `Qwen2Config` text
config with q/k/v biases, anyres_max_2 so that large grids are downscaled bilinearly), float32.
"""

import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as F
import lvm.hf
import lvm.models
import test_hf_anyres as A
from lvm import anyres_inputs
from lvm import config as lvm_config
from lvm import inference
from lvm.generate import Generator

NEW = 6


def qwen2_onevision(seed=0):
  text = transformers.Qwen2Config(
      vocab_size=F.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
  config = transformers.LlavaOnevisionConfig(
      vision_config=F.vision_config('siglip'), text_config=text,
      image_token_index=F.IMAGE_TOKEN, image_grid_pinpoints=A.OV_PINS,
      vision_aspect_ratio='anyres_max_2', vision_feature_layer=-1,
      vision_feature_select_strategy='full')
  torch.manual_seed(seed)
  return A._randomize(transformers.LlavaOnevisionForConditionalGeneration(config), seed)


@pytest.fixture(scope='module')
def case(tmp_path_factory):
  model = qwen2_onevision()
  folder = str(tmp_path_factory.mktemp('onevision_qwen2'))
  model.save_pretrained(folder)
  return model, folder


def test_logits_match_transformers(case):
  model, folder = case
  config, params = lvm.hf.load(folder)
  assert config.decoder.kind == 'qwen2' and config.decoder.attention_bias
  inputs = A.batch('onevision', config)
  ref = F.torch_logits(model, inputs)
  ours = A.lvm_logits(config, params, inputs)
  err = F.rel_err(ours, ref, inputs['attention_mask'])
  assert err < A.TOL, f'relative error {err:.2e}'


def test_greedy_matches_transformers_generate(case):
  model, folder = case
  with torch.no_grad():
    model.lm_head.weight.mul_(50)  # sharp logits: float noise cannot flip an argmax
  try:
    model_config, params = lvm.hf.load(folder)
    params['decoder']['lm_head']['kernel'] = params['decoder']['lm_head']['kernel'] * 50
    config = lvm_config.get_config()
    config.model = model_config
    config.data.image_mean, config.data.image_std = A.SIGLIP_MEAN, A.SIGLIP_STD
    # A wide image on a 1x3 grid, a tall 3x3 one downscaled (anyres_max_2), a small square.
    pil = [A._image(h, w, seed=i) for i, (h, w) in enumerate([(30, 100), (96, 80), (20, 20)])]
    images = [inference.load_image(config, im) for im in pil]
    rng = np.random.default_rng(2)
    prompts = [anyres_inputs.expand_image_tokens(
        [1, F.IMAGE_TOKEN, 13] + rng.integers(3, 400, 4).tolist(),
        [lvm.models.num_image_tokens(model_config, image_size=im.size)], F.IMAGE_TOKEN)
        for im in images]
    gen = Generator(config, params)
    outs = gen.generate(prompts, [[im] for im in images], max_new_tokens=NEW)
    for prompt, im, out in zip(prompts, pil, outs):
      processed = A._processor('onevision')([im], return_tensors='pt')
      ids = torch.tensor([prompt])
      with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=processed['pixel_values'],
                             image_sizes=processed['image_sizes'], max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0, suppress_tokens=[F.IMAGE_TOKEN])
      assert out.tokens == ref[0, len(prompt):].tolist()
  finally:
    with torch.no_grad():
      model.lm_head.weight.div_(50)
