"""Leaf layers shared by the vision tower, projector and decoder.

Every parameter carries logical axis names; `dtype` is the compute dtype and
`param_dtype` the storage dtype. Norms and softmax run in float32.

Einsum letters: B batch, T query length, S key length, D model width, H heads,
K kv heads, G heads per kv head, Dh head width, F mlp width.
"""

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


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
    transposed operand is a row-major copy (`_row_major_t`). XLA's CPU runs a bf16 dot on
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


def _row_major_t(a):
  """a.T as a row-major copy that XLA neither folds back into the dot nor lays out
  column-major (a plain transpose becomes a column-major view, and the barrier alone does
  not change that; through a trailing unit axis it stays a real copy)."""
  return _permuted_copy(a, (1, 0))


def _permuted_copy(x, perm):
  """x.transpose(perm) as a row-major copy that XLA keeps (see `_row_major_t`)."""
  y = x.reshape(*x.shape, 1).transpose(*perm, x.ndim)
  return jax.lax.optimization_barrier(y.reshape(y.shape[:-1]))


def _matmul_bwd(res, g):
  x, w = res
  # float32 measured faster with XLA's own transposes kept apart by a barrier; bfloat16
  # needs row-major copies to stay on its bf16 kernels.
  f32 = x.dtype == jnp.float32
  transpose = (lambda a: jax.lax.optimization_barrier(a.T)) if f32 else _row_major_t
  dx = _dot(g, w.T if f32 else _row_major_t(w))
  if x.shape[1] <= g.shape[1]:  # transpose the smaller operand
    dw = _dot(transpose(x), g)
  else:
    dw = _dot(transpose(g), x).T
  return dx, dw


matmul_cpu_layouts.defvjp(_matmul_fwd, _matmul_bwd)

# Dense layers use `matmul_cpu_layouts` when the default backend is the CPU (measured in
# docs/performance.md); GPU/TPU keep the plain dot_general, whose layouts and fusions
# their compilers choose well, and which remat policies see as a dot.
CPU_MATMUL_VJP = True


def dense_matmul(x, kernel, n_in: int):
  """Contracts the last `n_in` dims of x with the first `n_in` of kernel."""
  if CPU_MATMUL_VJP and jax.default_backend() == 'cpu':
    k = math.prod(kernel.shape[:n_in])
    y = matmul_cpu_layouts(x.reshape(-1, k), kernel.reshape(k, -1))
    return y.reshape(*x.shape[:x.ndim - n_in], *kernel.shape[n_in:])
  contract = tuple(range(x.ndim - n_in, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))


class Dense(nn.Module):
  """y = x @ W (+ b) over the last `len(in_axes)` dims of x, with named axes.

  `features` and `out_axes` may be tuples, so attention projections keep a separate
  heads axis that tensor parallelism can shard.
  """
  features: int | Sequence[int]
  in_axes: Axes
  out_axes: Axes
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x, *, kernel_only: bool = False):
    """x @ W; with `kernel_only`, W in the compute dtype instead (a caller concatenates
    several projections' kernels into one matmul, as `fused_dense` does)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel = param_with_axes(self, 'kernel', self.kernel_init, (*in_shape, *features),
                             (*self.in_axes, *self.out_axes), self.param_dtype)
    kernel = kernel.astype(self.dtype)
    if kernel_only:
      if self.use_bias:
        raise ValueError('Dense(kernel_only=True) has no place for the bias')
      return kernel
    x = x.astype(self.dtype)
    y = dense_matmul(x, kernel, n_in)
    if self.use_bias:
      bias = param_with_axes(self, 'bias', nn.initializers.zeros, features, self.out_axes,
                             self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def fused_dense(x, projections: Sequence[Dense], split_axis: int) -> list:
  """[p(x) for p in projections] as one matmul over their kernels concatenated on the
  output axis `split_axis` (counted in the kernel): one wide GEMM instead of several
  narrow ones. The parameters stay those of each projection."""
  kernels = [p(x, kernel_only=True) for p in projections]
  n_in = len(projections[0].in_axes)
  y = dense_matmul(x.astype(kernels[0].dtype), jnp.concatenate(kernels, axis=split_axis), n_in)
  sizes = [k.shape[split_axis] for k in kernels]
  bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
  return jnp.split(y, bounds, axis=y.ndim - kernels[0].ndim + split_axis)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalizes in float32, scales after casting back (as transformers)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axes: Axes = ('embed',)  # the logical name of the normalized (last) axis

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (x.shape[-1],), self.axes,
                            self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with statistics in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (d,), ('embed',), self.param_dtype)
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (d,), ('embed',), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU()
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),  # gelu_pytorch_tanh
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


# The primitive whose outputs are cuDNN flash attention's forward results (the attention output
# and its softmax statistics). jax.nn.dot_product_attention calls it inside its own custom VJP,
# so checkpoint_name cannot label them; a policy matches the primitive by name instead.
_CUDNN_ATTENTION_FWD = 'dot_product_attention_fwd_wrapper'


def _dots_and_flash_attention_saveable(prim, *args, **params) -> bool:
  """dots_no_batch, and also cuDNN attention's outputs: its forward is not run twice."""
  return (prim.name == _CUDNN_ATTENTION_FWD or
          jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# Activations the decoder block names (decoder.py) that its backward reads and that are not
# dots: the RMSNorm outputs (inputs of the q/k/v and gate/up weight gradients), q and k after
# RoPE (inputs of the attention backward) and the SwiGLU product (input of down_proj's).
_BLOCK_ACTIVATIONS = ('normed', 'query', 'key', 'mlp_hidden')


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'dots_no_batch_flash': _dots_and_flash_attention_saveable,
    # The backward then recomputes no forward op but RMSNorm's statistics.
    'dots_flash_activations': jax.checkpoint_policies.save_from_both_policies(
        _dots_and_flash_attention_saveable,
        jax.checkpoint_policies.save_only_these_names(*_BLOCK_ACTIVATIONS)),
    'save_attn_out': jax.checkpoint_policies.save_only_these_names('attn_out'),
    'save_qkv_attn_out': jax.checkpoint_policies.save_only_these_names(
        'query', 'key', 'value', 'attn_out'),
}


def stack_blocks(block_cls, *, depth: int, scan: bool, remat_policy: str,
                 in_axes: tuple, static_argnums: tuple = ()):
  """Wraps a block class for `depth` repetitions: nn.scan with params stacked on 'layers'.

  Returns the (possibly remat'ed and scanned) class. The block's signature must be
  `(carry, *args) -> (carry, y)`.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat_policy {remat_policy!r}; known: {sorted(REMAT_POLICIES)}')
  if remat_policy != 'none':
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan,
                         static_argnums=static_argnums)
  if scan:
    block_cls = nn.scan(block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=in_axes, length=depth,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
  return block_cls


def _keep_mask(mask, is_causal, b, kv, g, t, s):
  """The bool mask broadcastable to [B, K, G, T, S] (None: keep everything)."""
  keep = None
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mh = mask.shape[:2]
    keep = (mask[:, :, None] if mh == 1 else mask.reshape(mb, kv, g, *mask.shape[2:]))
  if is_causal:
    causal = jnp.tril(jnp.ones((t, s), dtype=bool))[None, None, None]
    keep = causal if keep is None else keep & causal
  return keep


def _heads_major(x, g):
  """[B, T, K*G, Dh] -> [B, K, G*T, Dh]: each kv head's queries (G heads x T) as rows."""
  b, t, h, dh = x.shape
  x = _permuted_copy(x.reshape(b, t, h // g, g, dh), (0, 2, 3, 1, 4))
  return x.reshape(b, h // g, g * t, dh)


def _tokens_major(x, g):
  """The inverse of `_heads_major`: [B, K, G*T, Dh] -> [B, T, K*G, Dh]."""
  b, kv, gt, dh = x.shape
  x = _permuted_copy(x.reshape(b, kv, g, gt // g, dh), (0, 3, 1, 2, 4))
  return x.reshape(b, gt // g, kv * g, dh)


def _bdot(a, b_, out_dtype):
  """Batched [..., M, K] @ [..., K, N] over the leading two dims, accumulated in float32."""
  out = jax.lax.dot_general(a, b_, (((3,), (2,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _attention_probs(qh, kt, mask, is_causal, scale, g):
  """float32 softmax of the scaled, masked logits [B, K, G*T, S] (as jax.nn's 'xla' path),
  and the keep mask as [B|1, K|1, G|1, T, S] (None: keep everything)."""
  b, kv, gt, _ = qh.shape
  t, s = gt // g, kt.shape[-1]
  logits = _bdot(qh, kt, jnp.float32) * jnp.float32(scale)
  keep = _keep_mask(mask, is_causal, b, kv, g, t, s)
  if keep is not None:
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits = jnp.where(keep, logits.reshape(b, kv, g, t, s), large_negative)
    logits = logits.reshape(b, kv, gt, s)
  return jax.nn.softmax(logits, axis=-1), keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention_cpu(q, k, v, mask, is_causal, scale):
  """jax.nn.dot_product_attention's 'xla' math laid out for XLA's CPU dots.

  The same computation as the 'xla' path (float32 softmax of the scaled, masked logits;
  the dots accumulate in float32), with two differences, both measured on the CPU side by
  side (docs/performance.md):
  - Layout: q, k, v are copied once into heads-major row-major operands (each kv head's G
    query heads stacked as rows, k also as [Dh, S]), so every dot is a plain batched
    [M, K] @ [K, N]. The [T, S] score matrices are never transposed: where a product
    needs one transposed, the small [T, Dh] operand is transposed instead (dV^T = dO^T P,
    dK^T = Q^T dS). Left to itself XLA transposed scores and heads around every dot,
    and on bfloat16 a dot with a column-major operand leaves the bf16 matrix units.
  - Backward: dS = P * (dP - rowsum(dO * O)) instead of differentiating the softmax graph.
  """
  return _attention_fwd(q, k, v, mask, is_causal, scale)[0]


def _attention_fwd(q, k, v, mask, is_causal, scale):
  g = q.shape[2] // k.shape[2]
  qh = _heads_major(q, g)                              # [B, K, G*T, Dh]
  kt = _permuted_copy(k, (0, 2, 3, 1))                 # [B, K, Dh, S]
  vh = _permuted_copy(v, (0, 2, 1, 3))                 # [B, K, S, Dh]
  probs, _ = _attention_probs(qh, kt, mask, is_causal, scale, g)
  p = probs.astype(v.dtype)
  out_h = _bdot(p, vh, v.dtype)                        # [B, K, G*T, Dh]
  return _tokens_major(out_h, g), (qh, kt, vh, mask, p, out_h)


def _attention_bwd(is_causal, scale, res, d_out):
  qh, kt, vh, mask, p, out_h = res
  b, kv, gt, dh = qh.shape
  s = kt.shape[-1]
  g = d_out.shape[2] // kv
  dt = qh.dtype
  f32 = jnp.promote_types(dt, jnp.float32)
  doh = _heads_major(d_out.astype(dt), g)              # [B, K, G*T, Dh]
  dvt = _bdot(_permuted_copy(doh, (0, 1, 3, 2)), p, f32)  # dV^T [B, K, Dh, S]
  dp = _bdot(doh, _permuted_copy(vh, (0, 1, 3, 2)), f32)  # [B, K, G*T, S]
  delta = jnp.sum(doh.astype(f32) * out_h.astype(f32), axis=-1, keepdims=True)
  ds = p.astype(f32) * (dp - delta) * jnp.array(scale, f32)
  # Masked keys have p == 0 exactly, so ds == 0 there already, unless a query row has
  # no key at all (then softmax spreads it uniformly and the where zeroes the gradient,
  # as autodiff of the masked logits does). A causal mask alone keeps the diagonal.
  if mask is not None:
    keep = _keep_mask(mask, is_causal, b, kv, g, gt // g, s)
    ds = jnp.where(keep, ds.reshape(b, kv, g, gt // g, s), 0.0).reshape(b, kv, gt, s)
  ds = ds.astype(dt)
  dq = _tokens_major(_bdot(ds, _permuted_copy(kt, (0, 1, 3, 2)), dt), g)
  dkt = _bdot(_permuted_copy(qh, (0, 1, 3, 2)), ds, f32)  # dK^T [B, K, Dh, S]
  dk = _permuted_copy(dkt, (0, 3, 1, 2)).astype(dt)    # [B, S, K, Dh]
  dv = _permuted_copy(dvt, (0, 3, 1, 2)).astype(dt)
  return dq, dk, dv, None


attention_cpu.defvjp(_attention_fwd, _attention_bwd)

ATTENTION_CPU_VJP = True


def dot_product_attention(q, k, v, *, mask=None, is_causal=False, implementation='xla'):
  """Attention over q[B, T, H, Dh], k/v[B, S, K, Dh] (GQA when K < H) -> [B, T, H, Dh].

  `mask` is bool, broadcastable to [B, H, T, S]; True keeps a key.
  """
  impl = None if implementation in (None, 'auto') else implementation
  if (ATTENTION_CPU_VJP and impl in (None, 'xla') and jax.default_backend() == 'cpu'):
    return attention_cpu(q, k, v, mask, is_causal, 1.0 / math.sqrt(q.shape[-1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=impl)
