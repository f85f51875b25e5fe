"""lvm/models/projector.py: kinds, token counts and the 2x2 pixel shuffle."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm.models import projector as projector_lib


def test_parse_kind():
  assert projector_lib.parse_kind('mlp2x_gelu') == ('mlp', 2, 'gelu')
  assert projector_lib.parse_kind('linear') == ('mlp', 1, '')
  assert projector_lib.parse_kind('mlp3x_silu') == ('mlp', 3, 'silu')
  with pytest.raises(ValueError, match='Unknown projector kind'):
    projector_lib.parse_kind('conv')
  with pytest.raises(ValueError, match='Unknown activation'):
    projector_lib.parse_kind('mlp2x_swish9')


def test_mlp2x_gelu_is_linear_gelu_linear():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6)), jnp.float32)
  proj = projector_lib.Projector('mlp2x_gelu', width=8)
  params = nn.unbox(proj.init(jax.random.PRNGKey(0), x)['params'])
  p1, p2 = params['linear_1'], params['linear_2']
  h = x @ p1['kernel'] + p1['bias']
  h = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))  # exact GELU (torch nn.GELU)
  np.testing.assert_allclose(proj.apply({'params': params}, x), h @ p2['kernel'] + p2['bias'],
                             rtol=1e-5, atol=1e-6)


def test_downsample_folds_2x2_neighbourhoods():
  side, d = 4, 3
  grid = jnp.arange(side * side * d, dtype=jnp.float32).reshape(1, side * side, d)
  proj = projector_lib.Projector('downsample_mlp', width=4 * d)
  params = nn.unbox(proj.init(jax.random.PRNGKey(0), grid)['params'])
  assert params['linear_1']['kernel'].shape == (4 * d, 4 * d)
  # An identity first layer exposes the folded tokens as linear_1's output.
  params['linear_1'] = {'kernel': jnp.eye(4 * d), 'bias': jnp.zeros(4 * d)}
  out, state = proj.apply({'params': params}, grid, capture_intermediates=True)
  assert out.shape == (1, projector_lib.tokens_out('downsample_mlp', 16), 4 * d) == (1, 4, 12)
  folded = np.asarray(state['intermediates']['linear_1']['__call__'][0])
  # Output token 1 (block row 0, block column 1) holds patches (0,2), (0,3), (1,2), (1,3).
  patches = np.asarray(grid[0]).reshape(side, side, d)
  expected = np.concatenate([patches[0, 2], patches[0, 3], patches[1, 2], patches[1, 3]])
  np.testing.assert_array_equal(folded[0, 1], expected)
  with pytest.raises(ValueError, match='square, even grid'):
    projector_lib.tokens_out('downsample_mlp', 17)


def test_identity_checks_width():
  x = jnp.ones((1, 4, 8))
  assert projector_lib.Projector('identity', width=8).apply({}, x).shape == (1, 4, 8)
  with pytest.raises(ValueError, match='vision width == decoder width'):
    projector_lib.Projector('identity', width=16).apply({}, x)
