"""lvm.hf.load vs transformers: float32 logits of imported tiny random LLaVAs match.

Criterion (the issue's): max |lvm - torch| / max |torch| < 1e-4 over real positions.
"""

import json
import os

import jax
import numpy as np
import pytest

import hf_fixtures as F
import lvm.hf
from lvm.hf import io
import lvm.models

TOL = 1e-4
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)

# name -> (llava() kwargs, images per row). Together they cover GQA and MHA, feature
# layers -2 / -1 / lists, both select strategies, CLIP and SigLIP, tied embeddings,
# linear and llama3 RoPE scaling, several images in a row, rows with different numbers
# of images, padding, and a text-only row.
CASES = {
    'clip_gqa_layer-2': (dict(), (2, 1, 0)),
    'clip_mha_full_tied_linear': (dict(kv_heads=4, feature_layer=-1, strategy='full', tie=True,
                                       rope=dict(rope_type='linear', factor=2.0)), (1, 2, 1)),
    'clip_list_llama3': (dict(kv_heads=1, feature_layer=[-3, -1], rope=LLAMA3), (2, 0, 1)),
    'siglip_default': (dict(vision='siglip', feature_layer=-1), (1, 2, 0)),
    'siglip_full_list_headdim': (dict(vision='siglip', feature_layer=[0, -2], strategy='full',
                                      head_dim=32), (2, 1, 1)),
}

_cache = {}


def case(name, tmp_path_factory):
  """(torch model, HF folder, inputs, torch logits), built once per session."""
  if name not in _cache:
    kwargs, rows = CASES[name]
    model = F.llava(**kwargs)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    inputs = F.batch(model, rows)
    _cache[name] = (model, folder, inputs, F.torch_logits(model, inputs))
  return _cache[name]


def lvm_logits(model_config, params, inputs):
  model = lvm.models.build(model_config)
  return np.asarray(jax.jit(model.apply)({'params': params}, inputs['images'],
                                         inputs['input_ids'], inputs['attention_mask']))


@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_transformers(name, tmp_path_factory):
  _, folder, inputs, ref = case(name, tmp_path_factory)
  model_config, params = lvm.hf.load(folder)
  ours = lvm_logits(model_config, params, inputs)
  assert ours.shape == ref.shape
  err = F.rel_err(ours, ref, inputs['attention_mask'])
  assert err < TOL, f'{name}: relative error {err:.2e}'


def test_config_translation(tmp_path_factory):
  _, folder, _, _ = case('clip_list_llama3', tmp_path_factory)
  c, _ = lvm.hf.load(folder)
  assert c.vision.kind == 'clip' and list(c.vision.feature_layer) == [-3, -1]
  assert c.vision.select == 'patch' and c.decoder.kv_heads == 1
  assert dict(c.decoder.rope_scaling)['type'] == 'llama3'
  assert c.image_token_id == F.IMAGE_TOKEN and c.decoder.vocab_size == F.VOCAB
  _, folder, _, _ = case('siglip_default', tmp_path_factory)
  c, params = lvm.hf.load(folder)
  # transformers' 'default' strategy drops token 0 even though SigLIP has no class token.
  assert c.vision.kind == 'siglip' and c.vision.select == 'drop_first'
  assert lvm.models.num_image_tokens(c) == (F.IMAGE_SIZE // F.PATCH) ** 2 - 1
  assert 'patch_bias' in params['vision'] and 'pre_layrnorm' not in params['vision']


def _rewrite(folder, out, rename):
  """Copies a HF folder with every tensor key renamed by `rename` (None drops it)."""
  os.makedirs(out)
  tensors = io.read_folder(folder)
  io.write_file(os.path.join(out, 'model.safetensors'),
                {rename(k): v for k, v in tensors.items() if rename(k)})
  with open(os.path.join(folder, 'config.json')) as f, \
       open(os.path.join(out, 'config.json'), 'w') as g:
    g.write(f.read())


def _llava_hf_layout(key):
  """transformers-5 save layout -> the one llava-hf published (CLIPVisionModel wrapper)."""
  return key.replace('vision_tower.', 'vision_tower.vision_model.', 1)


def _in_memory_layout(key):
  """-> the layout of transformers >= 4.52 (`model.` prefix, top-level lm_head)."""
  if key == 'language_model.lm_head.weight':
    return 'lm_head.weight'
  return 'model.' + key.replace('language_model.model.', 'language_model.', 1)


def test_key_layouts_load_identically(tmp_path_factory, tmp_path):
  model, folder, inputs, ref = case('clip_gqa_layer-2', tmp_path_factory)
  keys = set(io.read_folder(folder))
  assert 'language_model.model.embed_tokens.weight' in keys  # what transformers 5 writes
  _, base = lvm.hf.load(folder)
  for rename in (_llava_hf_layout, _in_memory_layout):
    out = str(tmp_path / rename.__name__)
    _rewrite(folder, out, rename)
    _, params = lvm.hf.load(out)
    jax.tree.map(np.testing.assert_array_equal, params, base)
  # The old llava-hf layout (with a stray position_ids buffer) gives transformers' logits.
  out = str(tmp_path / 'old_with_buffer')
  _rewrite(folder, out, _llava_hf_layout)
  tensors = {k: np.array(v) for k, v in io.read_folder(out).items()}  # off the memmap
  tensors['vision_tower.vision_model.embeddings.position_ids'] = np.arange(17)[None]
  io.write_file(os.path.join(out, 'model.safetensors'), tensors)
  c, params = lvm.hf.load(out)
  assert F.rel_err(lvm_logits(c, params, inputs), ref, inputs['attention_mask']) < TOL


def test_scan_and_unrolled_layers_agree(tmp_path_factory):
  _, folder, inputs, ref = case('clip_gqa_layer-2', tmp_path_factory)
  c, scanned = lvm.hf.load(folder, scan_layers=True)
  c2, unrolled = lvm.hf.load(folder, scan_layers=False)
  assert 'layers' in scanned['decoder'] and 'layers_0' in unrolled['decoder']
  a, b = lvm_logits(c, scanned, inputs), lvm_logits(c2, unrolled, inputs)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_bf16_compute_close_to_float32(tmp_path_factory):
  _, folder, inputs, ref = case('clip_gqa_layer-2', tmp_path_factory)
  c, params = lvm.hf.load(folder, dtype='bfloat16')
  assert c.param_dtype == 'float32'
  ours = lvm_logits(c, params, inputs)
  err = F.rel_err(ours.astype(np.float32), ref, inputs['attention_mask'])
  assert 1e-5 < err < 2e-2, f'bf16 relative error {err:.2e}'  # > 0: bf16 really ran


def test_bad_checkpoints_fail_clearly(tmp_path_factory, tmp_path):
  _, folder, _, _ = case('clip_gqa_layer-2', tmp_path_factory)
  # A pickle is refused, never loaded.
  pkl = tmp_path / 'pickled'
  pkl.mkdir()
  (pkl / 'config.json').write_text(open(os.path.join(folder, 'config.json')).read())
  (pkl / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(ValueError, match='never loads'):
    lvm.hf.load(str(pkl))
  # A missing tensor is named.
  out = str(tmp_path / 'missing')
  _rewrite(folder, out, lambda k: None if 'layers.1.mlp.up_proj' in k else k)
  with pytest.raises(ValueError, match='missing.*layers.1.mlp.up_proj'):
    lvm.hf.load(out)
  # A config that disagrees with the weights is a shape error naming the tensor.
  out = str(tmp_path / 'mismatch')
  _rewrite(folder, out, lambda k: k)
  cfg = json.load(open(os.path.join(out, 'config.json')))
  cfg['text_config']['intermediate_size'] = 96
  json.dump(cfg, open(os.path.join(out, 'config.json'), 'w'))
  with pytest.raises(ValueError, match='mlp.*expected shape'):
    lvm.hf.load(out)
