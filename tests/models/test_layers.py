"""RoPE and first_argmax (the kernels' tests are in tests/kernels/)."""

import jax
import jax.numpy as jnp
import numpy as np

from lvm import losses
from lvm.models import rope as rope_lib


def test_rope_is_rotate_half():
  # transformers' convention, written out: x * cos + concat(-x2, x1) * sin.
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 100, (2, 7))
  inv_freq = np.asarray(rope_lib.inv_freq(8, 10000.0))
  freqs = positions[..., None].astype(np.float32) * inv_freq
  freqs = np.concatenate([freqs, freqs], -1)[:, :, None]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  want = x * np.cos(freqs) + rotated * np.sin(freqs)
  for xp in (np, jnp):  # numpy tables (constants) and traced ones
    tables = rope_lib.tables(xp.asarray(positions), 8, 10000.0)
    got = rope_lib.apply(jnp.asarray(x), *tables)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_first_argmax_is_argmax_with_ties():
  rng = np.random.default_rng(3)
  logits = rng.integers(0, 4, (3, 5, 50)).astype(np.float32)  # many tied maxima
  logits[0, 0] = 0.0  # every index tied: the first wins
  for dtype in (jnp.float32, jnp.bfloat16):
    got = jax.jit(losses.first_argmax)(jnp.asarray(logits, dtype))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
