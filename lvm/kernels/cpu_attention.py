"""The CPU attention: jax.nn.dot_product_attention's 'xla' math laid out for XLA's CPU dots.

Registered as `model.attention_impl='cpu'` (what 'auto' selects on a CPU backend).
Einsum letters: B batch, T query length, S key length, H heads, K kv heads, G heads per
kv head, Dh head width.
"""

import functools
import math

import jax
import jax.numpy as jnp

from lvm import registry
from lvm.kernels.cpu_matmul import permuted_copy


def keep_mask(mask, is_causal, b, kv, g, t, s):
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
  x = permuted_copy(x.reshape(b, t, h // g, g, dh), (0, 2, 3, 1, 4))
  return x.reshape(b, h // g, g * t, dh)


def _tokens_major(x, g):
  """The inverse of `_heads_major`: [B, K, G*T, Dh] -> [B, T, K*G, Dh]."""
  b, kv, gt, dh = x.shape
  x = permuted_copy(x.reshape(b, kv, g, gt // g, dh), (0, 3, 1, 2, 4))
  return x.reshape(b, gt // g, kv * g, dh)


def _bdot(a, b_, out_dtype):
  """Batched [..., M, K] @ [..., K, N] over the leading two dims, accumulated in float32."""
  out = jax.lax.dot_general(a, b_, (((3,), (2,)), ((0, 1), (0, 1))),
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _attention_probs(qh, kt, mask, is_causal, scale, g):
  """float32 softmax of the scaled, masked logits [B, K, G*T, S] (as jax.nn's 'xla' path)."""
  b, kv, gt, _ = qh.shape
  t, s = gt // g, kt.shape[-1]
  logits = _bdot(qh, kt, jnp.float32) * jnp.float32(scale)
  keep = keep_mask(mask, is_causal, b, kv, g, t, s)
  if keep is not None:
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits = jnp.where(keep, logits.reshape(b, kv, g, t, s), large_negative)
    logits = logits.reshape(b, kv, gt, s)
  return jax.nn.softmax(logits, axis=-1)


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
  kt = permuted_copy(k, (0, 2, 3, 1))                  # [B, K, Dh, S]
  vh = permuted_copy(v, (0, 2, 1, 3))                  # [B, K, S, Dh]
  p = _attention_probs(qh, kt, mask, is_causal, scale, g).astype(v.dtype)
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
  dvt = _bdot(permuted_copy(doh, (0, 1, 3, 2)), p, f32)  # dV^T [B, K, Dh, S]
  dp = _bdot(doh, permuted_copy(vh, (0, 1, 3, 2)), f32)  # [B, K, G*T, S]
  delta = jnp.sum(doh.astype(f32) * out_h.astype(f32), axis=-1, keepdims=True)
  ds = p.astype(f32) * (dp - delta) * jnp.array(scale, f32)
  # Masked keys have p == 0 exactly, so ds == 0 there already, unless a query row has
  # no key at all (then softmax spreads it uniformly and the where zeroes the gradient,
  # as autodiff of the masked logits does). A causal mask alone keeps the diagonal.
  if mask is not None:
    keep = keep_mask(mask, is_causal, b, kv, g, gt // g, s)
    ds = jnp.where(keep, ds.reshape(b, kv, g, gt // g, s), 0.0).reshape(b, kv, gt, s)
  ds = ds.astype(dt)
  dq = _tokens_major(_bdot(ds, permuted_copy(kt, (0, 1, 3, 2)), dt), g)
  dkt = _bdot(permuted_copy(qh, (0, 1, 3, 2)), ds, f32)  # dK^T [B, K, Dh, S]
  dk = permuted_copy(dkt, (0, 3, 1, 2)).astype(dt)     # [B, S, K, Dh]
  dv = permuted_copy(dvt, (0, 3, 1, 2)).astype(dt)
  return dq, dk, dv, None


attention_cpu.defvjp(_attention_fwd, _attention_bwd)


@registry.ATTENTION.register('cpu')
def dot_product_attention_cpu(q, k, v, *, mask=None, is_causal=False):
  """`attention_cpu` with jax.nn's scale 1/sqrt(Dh), as an attention kernel (`lvm.kernels`)."""
  return attention_cpu(q, k, v, mask, is_causal, 1.0 / math.sqrt(q.shape[-1]))
