"""lvm/models/anyres_tables.py: the in-jit pack tables equal the host `anyres.pack_table`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm.data.anyres import LLAVA_NEXT_PINPOINTS, onevision_pinpoints
from lvm.models import anyres_tables as at

SMALL = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))


def _triples(rng, count):
  """(a, p, d) with a * p / d an integer (the float64 edge) half of the time."""
  out = []
  for _ in range(count):
    p = int(rng.choice([16, 32, 48, 96, 336, 672, 1008, 384, 1152, 2304,
                        int(rng.integers(1, 8193))]))
    d = int(rng.integers(1, at.MAX_SIDE + 1))
    if rng.random() < 0.5:
      a = int(rng.integers(1, at.MAX_SIDE + 1))
    else:
      step = d // np.gcd(p, d)
      a = d if rng.random() < 0.3 else min(step * int(rng.integers(1, max(2, at.MAX_SIDE // step))),
                                           at.MAX_SIDE)
    out.append((a, p, d))
  return np.asarray(out, np.int32)


def test_float_floor_mul_equals_python_floats():
  t = _triples(np.random.default_rng(0), 60000)
  got = np.asarray(jax.jit(at._float_floor_mul)(*(jnp.asarray(t[:, i]) for i in range(3))))
  want = np.array([int(a * (p / d)) for a, p, d in t.tolist()])
  exact = t[:, 0].astype(np.int64) * t[:, 1] // t[:, 2]
  assert (want < exact).sum() > 1000  # the float64 edge is exercised
  np.testing.assert_array_equal(got, want)
  assert int(79 * (336 / 79)) == 335 and int(at._float_floor_mul(79, 336, 79)) == 335


def _sizes(rng, count, pins):
  sizes = [(int(rng.integers(1, 3000)), int(rng.integers(1, 3000))) for _ in range(count)]
  # Panoramas, tiny images, the extremes, exact pinpoints, and float64 edge sides (79).
  sizes += [(1, 1), (1, at.MAX_SIDE), (at.MAX_SIDE, 1), (5, 4000), (4000, 5), (2, 3)]
  for ph, pw in pins:
    sizes += [(ph, pw), (ph + 1, pw - 1), (ph * 79, pw), (ph, 79), (79, pw), (ph // 2, pw * 7)]
  return [s for s in sizes if max(s) <= at.MAX_SIDE]


@pytest.mark.parametrize('pins,tile,patch,budget,count', [
    (LLAVA_NEXT_PINPOINTS, 336, 14, None, 1500),
    (onevision_pinpoints(384, 6), 384, 14, 9, 400),
    (SMALL, 32, 8, None, 1500),
    (onevision_pinpoints(32, 3), 32, 8, 2, 1500),
])
def test_tables_equal_host_pack_table(pins, tile, patch, budget, count):
  layout = at.Layout(tuple(pins), tile, patch, budget)
  sizes = _sizes(np.random.default_rng(count), count, pins)
  fn = jax.jit(lambda s: at.tables(layout, s))
  index, weight, newline, length = (np.asarray(x) for x in fn(jnp.asarray(sizes, jnp.int32)))
  for i, size in enumerate(sizes):
    ref = layout.host_table(size)
    assert length[i] == ref.length, size
    np.testing.assert_array_equal(index[i], ref.index, err_msg=str(size))
    np.testing.assert_array_equal(weight[i].view(np.uint32), ref.weight.view(np.uint32),
                                  err_msg=str(size))
    np.testing.assert_array_equal(newline[i], ref.newline, err_msg=str(size))


def test_absent_images_and_leading_axes():
  layout = at.Layout(SMALL, 32, 8)
  sizes = jnp.asarray([[[40, 90], [0, 0]], [[0, 5], [64, 64]]], jnp.int32)  # [B=2, N=2, 2]
  index, weight, newline, length = at.tables(layout, sizes)
  assert index.shape == (2, 2, layout.max_len, 1) and length.shape == (2, 2)
  assert length[0, 1] == 0 and length[1, 0] == 0
  assert not weight[0, 1].any() and not newline[1, 0].any() and not index[0, 1].any()
  assert length[0, 0] == layout.num_image_tokens((40, 90))
  np.testing.assert_array_equal(index[1, 1], layout.host_table((64, 64)).index)
