"""lvm/models/vision.py: feature selection, scanned vs unrolled towers, other resolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm.hf
from lvm.hf import keymap
from lvm.models import vision as vision_lib


def _tower(kind='clip', scan=False, feature_layers=(-2,), select='patch'):
  return vision_lib.VisionTower(kind=kind, image_size=16, patch_size=8, width=16, depth=3,
                                heads=2, mlp_dim=32, norm_eps=1e-5,
                                feature_layers=feature_layers, select=select, scan_layers=scan)


@pytest.mark.parametrize('kind,select,tokens', [
    ('clip', 'patch', 4), ('clip', 'all', 5), ('clip', 'drop_first', 4),
    ('siglip', 'patch', 4), ('siglip', 'all', 4), ('siglip', 'drop_first', 3)])
def test_selected_token_counts(kind, select, tokens):
  tower = _tower(kind, select=select)
  images = jnp.zeros((2, 16, 16, 3))
  out, _ = jax.eval_shape(tower.init_with_output, jax.random.PRNGKey(0), images)
  assert tower.num_tokens == tokens and out.shape == (2, tokens, 16)


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
def test_scanned_equals_unrolled_and_layers_concatenate(kind):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  layers = (-2, 0, -1)
  unrolled = _tower(kind, scan=False, feature_layers=layers, select='all')
  params = nn.unbox(jax.jit(unrolled.init)(jax.random.PRNGKey(0), images)['params'])
  flat = lvm.hf.traverse_util.flatten_dict(params, sep='/')
  stacked = lvm.hf.traverse_util.unflatten_dict(lvm.hf.stack_layers(
      {f'vision/{k}': np.asarray(v) for k, v in flat.items()}), sep='/')['vision']
  a = jax.jit(unrolled.apply)({'params': params}, images)
  scanned = _tower(kind, scan=True, feature_layers=layers, select='all')
  b = jax.jit(scanned.apply)({'params': stacked}, images)
  assert a.shape == (2, 5 if kind == 'clip' else 4, 3 * 16)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Each 16-wide slice is one hidden state: slice 1 (layer 0) is the embeddings alone.
  single = jax.jit(_tower(kind, feature_layers=(0,), select='all').apply)({'params': params},
                                                                          images)
  np.testing.assert_allclose(a[..., 16:32], single, rtol=1e-6, atol=1e-6)
  assert np.abs(a[..., :16] - a[..., 32:]).max() > 1e-3  # layers 2 and 3 differ


def test_bad_feature_layer_and_image_size():
  images = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match='out of range'):
    _tower(feature_layers=(4,)).init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match='expects images'):
    _tower().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))  # smaller than a patch


def _hf_tower(kind, seed=0):
  """A random transformers CLIP/SigLIP vision model (28 px, 7 px patches) and its lvm twin."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=28, patch_size=7)
  if kind == 'clip':
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
  else:
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        vision_use_head=False, **kw))
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model.eval()
  tower = vision_lib.VisionTower(kind=kind, image_size=28, patch_size=7, width=16, depth=2,
                                 heads=2, mlp_dim=32, norm_eps=1e-5 if kind == 'clip' else 1e-6,
                                 feature_layers=(-1,), select='all')
  shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))
  state = {k.replace('vision_model.', ''): v.numpy() for k, v in model.state_dict().items()}
  flat = {}
  for path, leaf in lvm.hf.traverse_util.flatten_dict(nn.unbox(shapes['params']),
                                                      sep='/').items():
    _, name, transform, n_in = keymap.hf_name(f'vision/{path}')
    flat[path] = keymap.to_lvm(state[name], transform, n_in, leaf.shape)
  return model, tower, lvm.hf.traverse_util.unflatten_dict(flat, sep='/')


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
@pytest.mark.parametrize('height,width', [(28, 28), (42, 42), (35, 56), (14, 70), (30, 50)])
def test_other_resolution_equals_transformers_interpolate_pos_encoding(kind, height, width):
  import torch  # pylint: disable=g-import-not-at-top
  model, tower, params = _hf_tower(kind)
  images = np.random.default_rng(1).normal(size=(2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]
  ours = jax.jit(tower.apply)({'params': params}, images)
  grid = (height // 7) * (width // 7)
  assert ours.shape == (2, grid + (kind == 'clip'), 16)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5, rtol=1e-5)
