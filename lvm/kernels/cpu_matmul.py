"""The CPU matmul: a 2-D dot with a custom backward laid out for XLA's CPU dots.

Registered as `model.matmul_impl='cpu'` (what 'auto' selects on a CPU backend). Every
layout choice here was measured on the CPU side by side (docs/performance.md); GPU/TPU
keep the plain `dot_general` (lvm/kernels/xla.py), whose layouts their compilers choose.
"""

import math

import jax
import jax.numpy as jnp

from lvm import registry


@jax.custom_vjp
def matmul_cpu_layouts(x, w):
  """x[M, K] @ w[K, N] as one 2-D dot, with a backward laid out for XLA's CPU dots.

  Two things, both measured on the CPU side by side (docs/performance.md):
  - Dense contracts a 2-D view ([B*L, in] @ [in, out]) instead of dot_general on the
    [B, L, in] activation (this alone, with plain autodiff, cut the cpu_small train step
    by about a fifth; the HLO of that variant was not inspected).
  - The weight gradient x^T g contracts the leading dim of both operands, a form the
    CPU dot runs at about half speed, so one operand must be transposed first. Left to
    itself XLA transposed g (for a SwiGLU the [B*L, mlp] gradient, fused with the
    activation gradient into a slow strided loop; for the LM head the [B*L, V] logits
    gradient). Here the smaller of x and g is transposed behind an optimization
    barrier (so it is not folded back into the dot) and the product is row-major.
  - bfloat16 operands: every dot accumulates in float32 and is cast after, and every
    transposed operand is a row-major copy (`row_major_t`). XLA's CPU runs a bf16 dot on
    its bf16 kernels (AMX / AVX512-BF16 where the CPU has them) only in that form; any
    other bf16 dot is converted to float32 first and runs slower than a float32 one.
  In float32, the same products and sums as the plain dot; only the layouts differ.
  """
  return _dot(x, w)


def _dot(a, b):
  """a @ b accumulated in float32, in a's dtype."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _matmul_fwd(x, w):
  return _dot(x, w), (x, w)


def permuted_copy(x, perm):
  """x.transpose(perm) as a row-major copy that XLA keeps: neither folded back into the dot
  nor laid out column-major (a plain transpose becomes a column-major view, and a barrier
  alone does not change that; through a trailing unit axis it stays a real copy)."""
  y = x.reshape(*x.shape, 1).transpose(*perm, x.ndim)
  return jax.lax.optimization_barrier(y.reshape(y.shape[:-1]))


def row_major_t(a):
  """a.T as a row-major copy (see `permuted_copy`)."""
  return permuted_copy(a, (1, 0))


def _matmul_bwd(res, g):
  x, w = res
  # float32 measured faster with XLA's own transposes kept apart by a barrier; bfloat16
  # needs row-major copies to stay on its bf16 kernels.
  f32 = x.dtype == jnp.float32
  transpose = (lambda a: jax.lax.optimization_barrier(a.T)) if f32 else row_major_t
  dx = _dot(g, w.T if f32 else row_major_t(w))
  if x.shape[1] <= g.shape[1]:  # transpose the smaller operand
    dw = _dot(transpose(x), g)
  else:
    dw = _dot(transpose(g), x).T
  return dx, dw


matmul_cpu_layouts.defvjp(_matmul_fwd, _matmul_bwd)


@registry.MATMUL.register('cpu')
def dense_matmul_cpu(x, kernel, n_in: int):
  """Contracts the last `n_in` dims of x with the first `n_in` of kernel, as one 2-D
  `matmul_cpu_layouts` ([prod(x's other dims), K] @ [K, N])."""
  k = math.prod(kernel.shape[:n_in])
  y = matmul_cpu_layouts(x.reshape(-1, k), kernel.reshape(k, -1))
  return y.reshape(*x.shape[:x.ndim - n_in], *kernel.shape[n_in:])
