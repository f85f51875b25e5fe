"""`anyres_tables.num_tiles` (traced) and `anyres_model.real_tile_features` (the tile budget)."""

import jax
import numpy as np

from lvm.data import anyres as data_anyres
from lvm.models import anyres_model
from lvm.models import anyres_tables

LAY = anyres_tables.Layout(((32, 64), (64, 32), (64, 64), (96, 32), (32, 96)), 32, 8)


def _embed(x):  # float[R, 32, 32, 3] -> float[R, 16, 4]: depends on each tile's pixels only
  return x.reshape(x.shape[0], 16, -1)[:, :, :4] * 2 + 1


def test_num_tiles_and_budgeted_features_under_jit():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 400, (4, 2, 2)).astype(np.int32)
  sizes[1, 1] = sizes[3, 0] = 0  # absent images
  grid = lambda s: int(np.prod(data_anyres.grid_shape(s, LAY.pinpoints, 32)))
  want = np.asarray([[0 if min(s) == 0 else 1 + grid(s) for s in row] for row in sizes])
  tiles = rng.normal(size=(4, 2, 5, 32, 32, 3)).astype(np.float32)
  real = np.arange(5) < want[..., None]
  every = np.where(real[..., None, None], _embed(tiles.reshape(40, 32, 32, 3)).reshape(
      4, 2, 5, 16, 4), 0)
  # Two groups of two rows, each with its own 12 of the 24 slots.
  per_group = want.reshape(2, -1).sum(-1).max()
  budget = 2 * int(per_group)

  @jax.jit
  def run(tiles, sizes):
    return (anyres_tables.num_tiles(LAY, sizes),
            anyres_model.real_tile_features(_embed, tiles, sizes, LAY, budget, groups=2))

  used, feats = run(tiles, sizes)
  np.testing.assert_array_equal(np.asarray(used), want)
  np.testing.assert_allclose(np.asarray(feats), every, rtol=1e-6)
