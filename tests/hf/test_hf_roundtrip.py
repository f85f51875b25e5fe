"""lvm -> transformers -> lvm: export, the CLI, and assembling from separate towers."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as F
import lvm.hf
from lvm.hf import io
import lvm.models
from configs import tiny

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_lvm(kind='clip', scan=True, tie=False, seed=0, qk_norm=False):
  """A tiny lvm model config and random params (norms and biases randomized too)."""
  config = tiny.get_config(f'scan={int(scan)}').model
  config.decoder.qk_norm = qk_norm
  config.vision.kind = kind
  config.vision.norm_eps = 1e-6 if kind == 'siglip' else 1e-5
  if kind == 'siglip':
    config.vision.select = 'all'  # SigLIP 'patch' keeps every token: exported as 'full'
  config.decoder.tie_embeddings = tie
  model = lvm.models.build(config)
  v = config.vision
  init = jax.jit(lambda rng: nn.unbox(model.init(
      rng, jnp.zeros((1, 1, v.image_size, v.image_size, 3)), jnp.zeros((1, 4), jnp.int32))))
  params = jax.device_get(init(jax.random.PRNGKey(seed))['params'])
  rng = np.random.default_rng(seed)
  return config, jax.tree.map(
      lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32), params)


def batch_for(config, images_per_row=(2, 1, 0), seq_len=48):
  """Inputs for lvm and torch (reusing hf_fixtures' layout with this config's token)."""
  p = lvm.models.num_image_tokens(config)
  rng = np.random.default_rng(0)
  b, n = len(images_per_row), max(images_per_row)
  v = config.vision
  images = rng.normal(size=(b, n, v.image_size, v.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, 500, size=(b, seq_len)).astype(np.int32)
  mask = np.ones((b, seq_len), bool)
  for row, k in enumerate(images_per_row):
    for i in range(k):
      ids[row, 2 + i * (p + 2):2 + i * (p + 2) + p] = config.image_token_id
  mask[1, -4:] = False
  real = np.concatenate([images[r, :k] for r, k in enumerate(images_per_row)])
  torch_inputs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      pixel_values=torch.from_numpy(real.transpose(0, 3, 1, 2).copy()))
  return dict(images=images, input_ids=ids, attention_mask=mask, torch=torch_inputs)


@pytest.mark.parametrize('kind,scan,tie,qk_norm', [
    ('clip', True, False, False), ('siglip', False, True, False),
    ('clip', False, False, True)])  # qk_norm: exported as a Qwen3 decoder
def test_export_loads_in_transformers_with_same_logits(kind, scan, tie, qk_norm, tmp_path):
  config, params = random_lvm(kind, scan, tie, qk_norm=qk_norm)
  lvm.hf.save(config, params, str(tmp_path))
  hf_model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  inputs = batch_for(config)
  ref = F.torch_logits(hf_model.eval(), inputs)
  ours = np.asarray(jax.jit(lvm.models.build(config).apply)(
      {'params': params}, inputs['images'], inputs['input_ids'], inputs['attention_mask']))
  err = F.rel_err(ours, ref, inputs['attention_mask'])
  assert err < TOL, f'relative error {err:.2e}'
  # ... and reading the folder back gives exactly the parameters that went in.
  config2, params2 = lvm.hf.load(str(tmp_path), scan_layers=scan)
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert config2.vision.to_dict() == config.vision.to_dict()
  # A LLaMA with qk_norm is transformers' Qwen3, and comes back as that family.
  assert config2.decoder.kind == ('qwen3' if qk_norm else 'llama')
  assert ({**config2.decoder.to_dict(), 'kind': 'llama'} == config.decoder.to_dict())
  assert config2.image_token_id == config.image_token_id


def test_stack_and_unstack_are_inverse():
  config = tiny.get_config('scan=1').model
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s.shape) for k, s in lvm.hf.abstract_params(config).items()}
  assert flat['decoder/layers/mlp/up_proj/kernel'].shape[0] == config.decoder.depth
  unstacked = lvm.hf.unstack_layers(flat)
  assert 'decoder/layers_1/mlp/up_proj/kernel' in unstacked
  restacked = lvm.hf.stack_layers(unstacked)
  assert restacked.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(restacked[k], flat[k])


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, '-m', 'lvm.hf', *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_cli_import_then_export(tmp_path):
  model = F.llava(feature_layer=[-3, -1], kv_heads=4)
  src = tmp_path / 'src'
  model.save_pretrained(str(src))
  out = _cli('import', str(src), str(tmp_path / 'imported'))
  assert 'wrote' in out and os.path.isdir(tmp_path / 'imported' / 'state')
  # The imported folder is an lvm checkpoint: lvm.checkpoint.load_params reads it.
  config, params = lvm.hf.load_converted(str(tmp_path / 'imported'))
  _, direct = lvm.hf.load(str(src))
  jax.tree.map(np.testing.assert_array_equal, params, direct)
  assert list(config.vision.feature_layer) == [-3, -1]
  _cli('export', str(tmp_path / 'imported'), str(tmp_path / 'exported'))
  src_tensors = io.read_folder(str(src))
  out_tensors = io.read_folder(str(tmp_path / 'exported'))
  # Same numbers under the (old llava-hf) names lvm writes.
  renamed = {k.replace('vision_tower.', 'vision_tower.vision_model.', 1): v
             for k, v in src_tensors.items()}
  assert renamed.keys() == out_tensors.keys()
  for k in renamed:
    np.testing.assert_array_equal(out_tensors[k], renamed[k], err_msg=k)


@pytest.mark.parametrize('decoder', ['llama', 'qwen3'])
def test_assemble_from_clip_and_llama(decoder, tmp_path):
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(F.vision_config('clip')).eval()
  llama = transformers.AutoModelForCausalLM.from_config(
      F.text_config(kv_heads=2, qwen3=decoder == 'qwen3')).eval()
  for m in (clip, llama):
    with torch.no_grad():
      for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)
  clip.save_pretrained(str(tmp_path / 'clip'))
  llama.save_pretrained(str(tmp_path / 'llama'))
  config, params = lvm.hf.assemble(str(tmp_path / 'clip'), str(tmp_path / 'llama'),
                                   feature_layer=-2, scan_layers=False)
  # llava-hf's layout: image token after the vocabulary, pad after it, rounded to 64.
  assert (config.image_token_id, config.pad_token_id, config.decoder.vocab_size) == (512, 513, 576)
  embed = params['decoder']['embed_tokens']
  torch_embed = llama.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(embed[:512], torch_embed)
  np.testing.assert_allclose(embed[512:], np.broadcast_to(torch_embed.mean(0), (64, 64)),
                             atol=1e-6)
  assert set(params['projector']) == {'linear_1', 'linear_2'}
  assert config.decoder.qk_norm == (decoder == 'qwen3')
  model = lvm.models.build(config)
  # Text only: the decoder is exactly the LLaMA.
  ids = np.random.default_rng(0).integers(0, 512, size=(2, 12)).astype(np.int32)
  ours = np.asarray(model.apply({'params': params}, None, ids))
  with torch.no_grad():
    ref = llama(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert F.rel_err(ours[..., :512], ref) < TOL
  # The vision features are CLIP's hidden state -2 without the class token.
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  feats = model.apply({'params': params}, images, method=lambda m, x: m.vision(x))
  with torch.no_grad():
    hidden = clip(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                  output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
  assert F.rel_err(feats, hidden) < TOL
