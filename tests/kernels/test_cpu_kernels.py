"""lvm/kernels: every matmul and attention kernel, the CPU custom VJPs and the accelerator
path alike, run on the CPU against the same references (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import kernels
from lvm.kernels import cpu_matmul

MATMULS = ('cpu', 'xla')
ATTENTIONS = ('cpu', 'xla', 'jax')
DTYPES = [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]


def _plain_dense(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)


def _vjp(f, args, ct):
  """(f(*args), the cotangent `ct` pulled back to args), jitted."""
  def run(*a):
    out, back = jax.vjp(f, *a)
    return out, back(ct.astype(out.dtype))
  return jax.jit(run)(*args)


def _close(got, want, tol):
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                             atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize('impl', MATMULS)
@pytest.mark.parametrize('dtype,tol', DTYPES, ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('shape', [(2, 24, 40, 56), (2, 24, 56, 40)], ids=['wide', 'narrow'])
def test_matmul_values_and_gradients_match_float32_autodiff(impl, dtype, tol, shape):
  # Both branches of the CPU backward: x narrower than g (x transposed) and wider.
  b, t, d_in, d_out = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, d_in)), dtype)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
  ct = jnp.asarray(rng.standard_normal((b, t, d_out)), dtype)
  out, grads = _vjp(lambda x, w: kernels.matmul(impl)(x, w, 1), (x, w), ct)
  # The reference differentiates the same (rounded) inputs in float32.
  ref_out, ref_grads = _vjp(_plain_dense, (x.astype(jnp.float32), w.astype(jnp.float32)), ct)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  _close(out, ref_out, tol)
  for got, want in zip(grads, ref_grads):
    _close(got, want, tol)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_cpu_matmul_forward_is_the_plain_dot_bit_for_bit(dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 24, 40)), dtype)
  w = jnp.asarray(rng.standard_normal((40, 56)), dtype)
  got = jax.jit(lambda x, w: kernels.matmul('cpu')(x, w, 1))(x, w)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(jax.jit(_plain_dense)(x, w), np.float32))


@pytest.mark.parametrize('impl', MATMULS)
def test_matmul_contracts_several_axes(impl):
  # Dense over (heads, head_dim) -> embed, as o_proj: [B, T, H, Dh] x [H, Dh, D].
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
  w = rng.standard_normal((3, 4, 6)).astype(np.float32)
  got = jax.jit(lambda x, w: kernels.matmul(impl)(x, w, 2))(x, w)
  np.testing.assert_allclose(got, np.einsum('bthd,hde->bte', x, w), rtol=1e-5, atol=1e-5)


def _reference_attention(q, k, v, mask, is_causal):
  """Attention written out in float32: kv heads repeated, masked logits at -inf-like."""
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  t, s = logits.shape[-2:]
  keep = jnp.ones((1, 1, t, s), bool)
  if mask is not None:
    keep = keep & mask
  if is_causal:
    keep = keep & jnp.tril(jnp.ones((t, s), bool))
  logits = jnp.where(keep, logits, -0.7 * float(jnp.finfo(jnp.float32).max))
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize('impl', ATTENTIONS)
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('masking', ['causal', 'mask'])
@pytest.mark.parametrize('kv', [1, 2, 4], ids=['mqa', 'gqa', 'mha'])
def test_attention_values_and_gradients_match_the_reference(impl, dtype, tol, masking, kv):
  rng = np.random.default_rng(3)
  b, t, h, dh = 2, 12, 4, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, dh)), dtype) for n in (h, kv, kv))
  ct = jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)
  causal = masking == 'causal'
  mask = None
  if not causal:
    mask = rng.random((b, 1, t, t)) > 0.3
    mask[0, 0, 1] = False  # a query that sees no key at all (zero gradients, as autodiff)
    mask[:, :, :, 0] = True
    mask[1, 0, 1, 0] = False
    mask = jnp.asarray(mask)
  out, grads = _vjp(lambda q, k, v: kernels.attention(impl)(q, k, v, mask=mask, is_causal=causal),
                    (q, k, v), ct)
  ref_out, ref_grads = _vjp(lambda q, k, v: _reference_attention(q, k, v, mask, causal),
                            (q, k, v), ct)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  _close(out, ref_out, tol)
  for got, want in zip(grads, ref_grads):
    _close(got, want, tol)


def test_attention_per_head_mask():
  """A [B, H, T, S] mask (one per head) reaches the right heads under every kernel."""
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 6, n, 8)), jnp.float32) for n in (4, 2, 2))
  mask = jnp.asarray(rng.random((2, 4, 6, 6)) > 0.3) | jnp.eye(6, dtype=bool)
  want = _reference_attention(q, k, v, mask, False)
  for impl in ATTENTIONS:
    got = jax.jit(lambda q, k, v: kernels.attention(impl)(q, k, v, mask=mask))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=impl)


def test_permuted_copy_is_the_transpose():
  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(jax.jit(lambda a: cpu_matmul.permuted_copy(a, (2, 0, 1)))(x),
                                x.transpose(2, 0, 1))
  np.testing.assert_array_equal(jax.jit(cpu_matmul.row_major_t)(x[0]), x[0].T)
