"""lvm/models/vision.py: feature selection, and scanned vs unrolled towers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm.hf
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
    _tower().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
