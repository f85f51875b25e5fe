"""lvm/models/layers.py: the CPU backward passes (Dense, attention) against autodiff, RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import losses
from lvm.models import decoder as decoder_lib
from lvm.models import layers


def _plain_dense(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('shape', [(2, 24, 40, 56), (2, 24, 56, 40)], ids=['wide', 'narrow'])
def test_cpu_dense_gradients_match_autodiff(dtype, tol, shape):
  # Both branches of the backward: x narrower than g (x transposed) and wider (g transposed).
  b, t, d_in, d_out = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, d_in)), dtype)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
  ct = jnp.asarray(rng.standard_normal((b, t, d_out)), dtype)

  def grads(f):
    def vjp(x, w):
      out, back = jax.vjp(f, x, w)
      return back(ct.astype(out.dtype))
    return jax.jit(vjp)(x, w)

  ours = grads(lambda x, w: layers.dense_matmul(x, w, 1))
  # The reference differentiates the same bf16 inputs in float32.
  ref = grads(lambda x, w: _plain_dense(x.astype(jnp.float32), w.astype(jnp.float32)))
  assert ours[0].dtype == dtype and ours[1].dtype == dtype
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(r))))
  fwd = jax.jit(lambda x, w: layers.dense_matmul(x, w, 1))(x, w)
  np.testing.assert_array_equal(np.asarray(fwd, np.float32),
                                np.asarray(jax.jit(_plain_dense)(x, w), np.float32))


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('causal', [True, False])
def test_cpu_attention_gradients_match_autodiff(dtype, tol, causal):
  rng = np.random.default_rng(1)
  b, t, h, kv, dh = 2, 12, 4, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, dh)), dtype) for n in (h, kv, kv))
  ct = jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)
  mask = None if causal else jnp.asarray(rng.random((b, 1, t, t)) > 0.3)

  def grads(f, *args):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](ct.astype(a[0].dtype)))(*args)

  ours = grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask,
                                                            is_causal=causal), q, k, v)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  ref = grads(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, implementation='xla'), *f32)
  for a, r in zip(ours, ref):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(r))))


def test_rope_is_rotate_half():
  # transformers' convention, written out: x * cos + concat(-x2, x1) * sin.
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 100, (2, 7))
  inv_freq = np.asarray(decoder_lib.rope_inv_freq(8, 10000.0))
  freqs = positions[..., None].astype(np.float32) * inv_freq
  freqs = np.concatenate([freqs, freqs], -1)[:, :, None]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  want = x * np.cos(freqs) + rotated * np.sin(freqs)
  for xp in (np, jnp):  # numpy tables (constants) and traced ones
    tables = decoder_lib.rope_tables(xp.asarray(positions), inv_freq)
    got = decoder_lib.apply_rope(jnp.asarray(x), *tables)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_first_argmax_is_argmax_with_ties():
  rng = np.random.default_rng(3)
  logits = rng.integers(0, 4, (3, 5, 50)).astype(np.float32)  # many tied maxima
  logits[0, 0] = 0.0  # every index tied: the first wins
  for dtype in (jnp.float32, jnp.bfloat16):
    got = jax.jit(losses.first_argmax)(jnp.asarray(logits, dtype))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
