"""The decoder of every family: LLaMA blocks (RMSNorm, RoPE, GQA attention, gated MLP) with
the few switches the families differ by (`Decoder`'s fields: q/k/v biases, Gemma's norms,
GeGLU, embedding scale and soft-capping, sliding windows, post-norms, qk-norm).

Layout follows transformers' LlamaForCausalLM so checkpoints map one to one.
Letters: B batch, T query length, S key (cache) length, D width, H heads, K kv heads,
Dh head width, F mlp width, V vocabulary, L layers.

The KV cache is a plain pytree `{'k': float[L, B, S, K, Dh], 'v': ...}` passed in and
returned, so generation stays a pure function of (params, cache); a sliding window only
masks it (the cache keeps every slot). The families register in `lvm.models.families`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lvm import kernels
from lvm import quantize
from lvm.models import layers
from lvm.models import rope as rope_lib
from lvm.models.layers import Dense, RMSNorm


NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # as jax.nn's masked logits


class OffsetRMSNorm(nn.Module):
  """Gemma's RMSNorm: scale (offset + w), applied in float32 before the cast back (as
  transformers' GemmaRMSNorm); w starts at zero. Its parameter is named as RMSNorm's."""
  eps: float = 1e-6
  offset: float = 1.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  axes: layers.Axes = ('embed',)

  @nn.compact
  def __call__(self, x):
    w = layers.param_with_axes(self, 'scale', nn.initializers.zeros, (x.shape[-1],), self.axes,
                               self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * (self.offset + w.astype(jnp.float32))).astype(self.dtype)


def rms_norm(eps: float, offset: float, **kw) -> nn.Module:
  """LLaMA's RMSNorm (offset 0), or Gemma's (1 + w) one."""
  return OffsetRMSNorm(eps, offset, **kw) if offset else RMSNorm(eps, **kw)


def softcapped_attention(q, k, v, mask, scale: float, softcap: float):
  """Attention with `softcap * tanh(logits / softcap)` logits (Gemma 2), in XLA math.

  No registered kernel caps the logits, so this path computes them itself: float32
  logits and softmax, GQA by grouping the query heads of each kv head.

  Args:
    q: float[B, T, H, Dh]; k, v: float[B, S, K, Dh]; mask: bool broadcastable to
      [B, 1, T, S] (True keeps a key); scale: the logit scale; softcap: > 0.

  Returns:
    float[B, T, H, Dh].
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, dh)
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, :, None], logits, NEG_INF)  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, dh)


class Attention(nn.Module):
  """GQA self-attention with RoPE; options for the families (see `Decoder`)."""
  heads: int
  kv_heads: int
  head_dim: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  fuse_projections: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-5
  matmul_impl: str = 'xla'
  attention_bias: bool = False
  norm_offset: float = 0.0
  query_scale: float = 0.0
  attn_softcap: float = 0.0

  @nn.compact
  def __call__(self, x, rope, mask, cache, cache_index, layer=0):
    """x float[B, T, D], rope (cos, sin) -> (float[B, T, D], updated cache or None).

    `cache` is the whole model's {'k', 'v': [layers, B, S, K, Dh]}; this layer (`layer`, an
    int or a traced index under scan) writes its T new keys and values at `cache_index` and
    attends to its own slice. Only those slots are written: passed along the layers (the
    scan's carry), the cache is updated in place, never copied whole per token.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)
    bias = dict(use_bias=True) if self.attention_bias else {}
    projections = [
        Dense((self.heads, self.head_dim), ('embed',), ('heads', 'head_dim'), name='q_proj',
              **bias, **kw),
        Dense((self.kv_heads, self.head_dim), ('embed',), ('kv_heads', 'head_dim'),
              name='k_proj', **bias, **kw),
        Dense((self.kv_heads, self.head_dim), ('embed',), ('kv_heads', 'head_dim'),
              name='v_proj', **bias, **kw)]
    if self.fuse_projections and not self.attention_bias:  # fused kernels carry no bias
      q, k, v = layers.fused_dense(x, projections, split_axis=1)  # on the heads axis
    else:
      q, k, v = (p(x) for p in projections)
    if self.qk_norm:  # per head, before RoPE (as Qwen3's q_norm / k_norm)
      norm_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axes=('head_dim',))
      q = rms_norm(self.norm_eps, self.norm_offset, name='q_norm', **norm_kw)(q)
      k = rms_norm(self.norm_eps, self.norm_offset, name='k_norm', **norm_kw)(k)
    q, k = rope_lib.apply(q, *rope), rope_lib.apply(k, *rope)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'act_heads', None))
    q, k, v = checkpoint_name(q, 'query'), checkpoint_name(k, 'key'), checkpoint_name(v, 'value')
    new_cache = None
    if cache is not None:
      at = (layer, 0, cache_index, 0, 0)
      new_cache = {name: jax.lax.dynamic_update_slice(
          cache[name], new.astype(cache[name].dtype)[None], at)
                   for name, new in (('k', k), ('v', v))}
      k, v = (jax.lax.dynamic_index_in_dim(new_cache[name], layer, keepdims=False)
              .astype(self.dtype) for name in ('k', 'v'))
    scale = (self.query_scale or self.head_dim) ** -0.5
    if self.attn_softcap:
      if mask is None:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
      out = softcapped_attention(q, k, v, mask, scale, self.attn_softcap)
    else:
      if self.query_scale:  # the kernels scale by 1/sqrt(Dh): fold the difference into q
        q = (q.astype(jnp.float32) * (scale * self.head_dim ** 0.5)).astype(q.dtype)
      out = kernels.attention(self.attention_impl)(q, k, v, mask=mask, is_causal=mask is None)
    out = checkpoint_name(out, 'attn_out')
    out = Dense(x.shape[-1], ('heads', 'head_dim'), ('embed',), name='o_proj', **kw)(out)
    return out, new_cache


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (gelu_tanh)."""
  mlp_dim: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  fuse_projections: bool = False
  matmul_impl: str = 'xla'
  act: str = 'silu'

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)
    projections = [Dense(self.mlp_dim, ('embed',), ('mlp',), name='gate_proj', **kw),
                   Dense(self.mlp_dim, ('embed',), ('mlp',), name='up_proj', **kw)]
    if self.fuse_projections:
      gate, up = layers.fused_dense(x, projections, split_axis=1)
    else:
      gate, up = (p(x) for p in projections)
    # The activation in float32, rounded once to the compute dtype, as torch's bfloat16
    # kernel does (not once per neg / exp / add / divide); the product stays in that dtype.
    act = layers.activation(self.act)(gate.astype(jnp.float32)).astype(gate.dtype)
    h = nn.with_logical_constraint(act * up, ('batch', 'length', 'act_mlp'))
    h = checkpoint_name(h, 'mlp_hidden')
    return Dense(x.shape[-1], ('mlp',), ('embed',), name='down_proj', **kw)(h)


class DecoderBlock(nn.Module):
  """Pre-norm block; with `post_norms` (Gemma 2) the attention and MLP outputs are normed
  too, before their residual adds (transformers' names: input_layernorm,
  post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm)."""
  heads: int
  kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  fuse_projections: bool = False
  qk_norm: bool = False
  matmul_impl: str = 'xla'
  attention_bias: bool = False
  norm_offset: float = 0.0
  mlp_act: str = 'silu'
  query_scale: float = 0.0
  attn_softcap: float = 0.0
  post_norms: bool = False

  @nn.compact
  def __call__(self, carry, rope, mask, cache_index, sliding=None, layer=0):
    """carry (x, the whole cache or None) -> (carry, None): the scan's carry, so that the
    cache is updated in place (`Attention`). `mask` is one mask, or with `sliding` (a bool,
    per layer under scan) the pair (global, sliding-window) of which this layer takes one;
    `layer` is this layer's index (per layer under scan)."""
    x, cache = carry
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: rms_norm(self.norm_eps, self.norm_offset, name=name, **kw)
    if sliding is not None:
      mask = jnp.where(sliding, mask[1], mask[0])
    h = checkpoint_name(norm('input_layernorm')(x), 'normed')
    h, new_cache = Attention(self.heads, self.kv_heads, self.head_dim,
                             attention_impl=self.attention_impl, matmul_impl=self.matmul_impl,
                             fuse_projections=self.fuse_projections, qk_norm=self.qk_norm,
                             norm_eps=self.norm_eps, attention_bias=self.attention_bias,
                             norm_offset=self.norm_offset, query_scale=self.query_scale,
                             attn_softcap=self.attn_softcap, name='self_attn',
                             **kw)(h, rope, mask, cache, cache_index, layer)
    if self.post_norms:
      x = x + norm('post_attention_layernorm')(h)
      h = checkpoint_name(norm('pre_feedforward_layernorm')(x), 'normed')
    else:
      x = x + h
      h = checkpoint_name(norm('post_attention_layernorm')(x), 'normed')
    h = MLP(self.mlp_dim, fuse_projections=self.fuse_projections, matmul_impl=self.matmul_impl,
            act=self.mlp_act, name='mlp', **kw)(h)
    if self.post_norms:
      h = norm('post_feedforward_layernorm')(h)
    x = nn.with_logical_constraint(x + h, ('batch', 'length', 'act_embed'))
    return (x, new_cache), None


class Decoder(nn.Module):
  """The causal decoder of every family (`embed` and `__call__`); the fields after
  `matmul_impl` are where the families differ (lvm.models.families)."""
  vocab_size: int
  width: int
  depth: int
  heads: int
  kv_heads: int
  mlp_dim: int
  head_dim: int = 0  # 0: width // heads
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'xla'
  precast_weights: bool = True
  # q/k/v and gate/up projections each as one matmul over their concatenated kernels.
  fuse_projections: bool = False
  # RMSNorm of each head's query and key before RoPE (Qwen3, OLMo-2, Gemma 3); not in LLaMA.
  qk_norm: bool = False
  matmul_impl: str = 'xla'  # attention_impl and matmul_impl: resolved kernels (lvm.kernels)
  # The families' differences (lvm.models.families sets them from `config.model.decoder`):
  attention_bias: bool = False  # biases on q/k/v (Qwen2)
  norm_offset: float = 0.0  # RMSNorm scale (offset + w): 1 for Gemma's (1 + w)
  mlp_act: str = 'silu'  # gate activation (layers.ACTIVATIONS): silu | gelu_tanh (GeGLU)
  embed_scale: bool = False  # token embeddings x sqrt(width), in the compute dtype (Gemma)
  query_scale: float = 0.0  # attention logits / sqrt(query_scale); 0: head_dim (Gemma 2)
  attn_softcap: float = 0.0  # logits -> c * tanh(logits / c) in attention (Gemma 2); 0: off
  final_softcap: float = 0.0  # the same on the output logits (Gemma 2); 0: off
  sliding_window: int = 0  # keys at most this many slots back, incl. itself; 0: off
  global_every: int = 0  # with a window, layer i is global iff (i + 1) % global_every == 0
  post_norms: bool = False  # norms after attention and MLP too (Gemma 2)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.width // self.heads

  def setup(self):
    if self.heads % self.kv_heads:
      raise ValueError(f'decoder heads ({self.heads}) must be a multiple of kv_heads '
                       f'({self.kv_heads})')
    self.embed_tokens = self.param(
        'embed_tokens', nn.with_logical_partitioning(layers.default_kernel_init,
                                                     ('vocab', 'embed')),
        (self.vocab_size, self.width), self.param_dtype)
    block_kw = dict(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.resolved_head_dim,
                    mlp_dim=self.mlp_dim, norm_eps=self.norm_eps, dtype=self.dtype,
                    param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                    fuse_projections=self.fuse_projections, qk_norm=self.qk_norm,
                    matmul_impl=self.matmul_impl, attention_bias=self.attention_bias,
                    norm_offset=self.norm_offset, mlp_act=self.mlp_act,
                    query_scale=self.query_scale, attn_softcap=self.attn_softcap,
                    post_norms=self.post_norms)
    block = layers.stack_blocks(
        DecoderBlock, depth=self.depth, scan=self.scan_layers, remat_policy=self.remat_policy,
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0))
    if self.precast_weights and not self.is_initializing():
      # A block uses each of its parameters only cast to `dtype`. Casting the layers' weights
      # once, before the layer loop, replaces a cast per layer in the forward pass and another
      # in the remat recompute. Same logits; the weight gradients are rounded to `dtype` per
      # layer before their float32 sum, as the GPU's GEMMs round them anyway.
      block = nn.map_variables(block, 'params', trans_in_fn=self._to_compute_dtype)
    if self.scan_layers:
      self.layers = block(**block_kw)
    else:
      self.layers = [block(**block_kw) for _ in range(self.depth)]
    self.norm = rms_norm(self.norm_eps, self.norm_offset, dtype=self.dtype,
                         param_dtype=self.param_dtype)
    if not self.tie_embeddings:
      self.lm_head = Dense(self.vocab_size, ('embed',), ('vocab',), dtype=self.dtype,
                           param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)

  def _to_compute_dtype(self, variables):
    # Quantized frozen kernels stay quantized: Dense dequantizes them one layer at a time.
    return jax.tree.map(lambda v: v if isinstance(v, quantize.QArray) else v.astype(self.dtype),
                        variables, is_leaf=lambda v: isinstance(v, quantize.QArray))

  def embed(self, input_ids):
    """int[B, T] -> float[B, T, D]."""
    x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
    if self.embed_scale:  # the scale rounded to the compute dtype, as transformers' Gemma
      x = x * jnp.asarray(self.width ** 0.5, self.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

  def __call__(self, x, positions=None, attention_mask=None, cache=None, cache_index=None,
               logit_positions=None, segment_ids=None):
    """Runs the blocks and the LM head.

    Args:
      x: float[B, T, D] input embeddings.
      positions: int[B, T] RoPE positions (default: cache_index + arange(T)).
      attention_mask: bool[B, S] which keys are real (S = T, or the cache length);
        None means every key is real (pure causal attention).
      cache: None, or {'k','v': float[L, B, S, K, Dh]} to write this chunk into.
      cache_index: int scalar, the cache slot of x's first token.
      logit_positions: optional int[B, P]: the LM head runs only at these positions of each
        row (training scores only text targets; image positions need no logits).
      segment_ids: optional int[B, T] of a packed batch (lvm.data.packing): a query attends
        only to keys of its own segment (0 = padding, which attends only to padding). Give
        `positions` restarting per segment with it. Training only (no cache).

    Returns:
      (logits float[B, T, V] (or [B, P, V]), updated cache or None).
    """
    b, t, _ = x.shape
    if segment_ids is not None and cache is not None:
      raise ValueError('segment_ids (packed rows) are for training and scoring; a KV cache '
                       'continues one sample per row')
    if cache is not None and cache_index is None:
      cache_index = jnp.zeros((), jnp.int32)
    start = 0 if cache is None else cache_index
    if positions is None:
      if cache is None:  # static: numpy, so the RoPE tables are constants
        positions = np.arange(t, dtype=np.int32)[None]
      else:
        positions = (start + jnp.arange(t, dtype=jnp.int32))[None]
    rope = rope_lib.tables(positions, self.resolved_head_dim, self.rope_theta,
                           dict(self.rope_scaling) if self.rope_scaling else None)
    mask = self._masks(t, start, attention_mask, cache, segment_ids)
    sliding = self.sliding_layers()
    if self.scan_layers:
      (x, new_cache), _ = self.layers((x, cache), rope, mask, cache_index,
                                      None if sliding is None else jnp.asarray(sliding),
                                      jnp.arange(self.depth, dtype=jnp.int32))
    else:
      new_cache = cache
      for i, block in enumerate(self.layers):
        (x, new_cache), _ = block((x, new_cache), rope, mask, cache_index,
                                  None if sliding is None else sliding[i], i)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    x = self.norm(x)
    if self.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x, self.embed_tokens.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    if self.final_softcap:
      cap = jnp.float32(self.final_softcap)
      logits = (jnp.tanh(logits.astype(jnp.float32) / cap) * cap).astype(logits.dtype)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'act_vocab'))
    return logits, new_cache

  def sliding_layers(self) -> np.ndarray | None:
    """bool[L]: which layers attend within the window (None: no window)."""
    if not self.sliding_window:
      return None
    i = np.arange(self.depth)
    return (i + 1) % self.global_every != 0 if self.global_every else np.ones(self.depth, bool)

  def _masks(self, t, start, attention_mask, cache, segment_ids=None):
    """The attention mask bool[B|1, 1, T, S] (None: causal, for the kernels' own mask),
    or with a window the pair (causal, causal within the window). With `segment_ids` every
    mask also keeps only the query's own segment: one [B, 1, T, T] mask that each attention
    kernel takes as it takes a padding mask (cuDNN as an additive bias; docs/data.md).

    Slots, not RoPE positions, measure the window (as transformers' cache positions): a
    row's real tokens sit in consecutive slots, so the two differ only on padding.
    """
    if (cache is None and attention_mask is None and segment_ids is None
        and not self.sliding_window):
      return None
    s = t if cache is None else cache['k'].shape[2]
    query_slot = start + jnp.arange(t)[:, None]
    key_slot = jnp.arange(s)[None, :]
    mask = (key_slot <= query_slot)[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
      mask = mask & attention_mask[:, None, None, :].astype(bool)
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if not self.sliding_window:
      return mask
    return mask, mask & (key_slot > query_slot - self.sliding_window)[None, None]

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    """Zeros {'k','v': [L, B, S, K, Dh]} (callable unbound: it reads only fields)."""
    shape = (self.depth, batch_size, max_len, self.kv_heads, self.resolved_head_dim)
    dtype = dtype or self.dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
