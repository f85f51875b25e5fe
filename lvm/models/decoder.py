"""LLaMA decoder: RMSNorm, RoPE (plain / linear / llama3 scaling), GQA attention, SwiGLU.

Layout follows transformers' LlamaForCausalLM so checkpoints map one to one.
Letters: B batch, T query length, S key (cache) length, D width, H heads, K kv heads,
Dh head width, F mlp width, V vocabulary, L layers.

The KV cache is a plain pytree `{'k': float[L, B, S, K, Dh], 'v': ...}` passed in and
returned, so generation stays a pure function of (params, cache). The family registers
here as 'llama' (`lvm.registry.DECODER`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lvm import kernels
from lvm import registry
from lvm.models import checks
from lvm.models import layers
from lvm.models.layers import Dense, RMSNorm


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies float32[Dh/2], with transformers' 'linear' and 'llama3' scaling.

  numpy: they depend only on the config, so the RoPE tables of a forward without a cache
  are constants of the compiled program (`rope_tables`).
  """
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)))
  inv_freq = inv_freq.astype(np.float32)
  if not scaling:
    return inv_freq
  kind = scaling.get('type', scaling.get('rope_type'))
  factor = np.float32(scaling['factor'])
  if kind == 'linear':
    return inv_freq / factor
  if kind == 'llama3':
    low, high = np.float32(scaling['low_freq_factor']), np.float32(scaling['high_freq_factor'])
    old_len = np.float32(scaling['original_max_position_embeddings'])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"Unknown rope_scaling type {kind!r}; supported: 'linear', 'llama3'")


def rope_tables(positions, inv_freq):
  """(cos, sin) float32[B, T, Dh/2] of positions int[B, T], once for every layer.

  With numpy positions (a forward without a cache) the tables are computed in numpy,
  constants of the compiled program. Computed in the graph, XLA fused them into the rotation and
  its CPU loops evaluated cos and sin again for every element of q and k, in every layer
  (docs/performance.md, "Third round").
  """
  xp = np if isinstance(positions, np.ndarray) else jnp
  freqs = positions[..., None].astype(xp.float32) * inv_freq
  return jnp.asarray(xp.cos(freqs)), jnp.asarray(xp.sin(freqs))


def apply_rope(x, cos, sin):
  """Rotates x[B, T, H, Dh] by `rope_tables` (the rotate-half convention)."""
  b, t, h, dh = x.shape
  cos = cos[:, :, None, None, :]
  sin = sin[:, :, None, None, :]
  sin = jnp.concatenate([-sin, sin], axis=3)  # [B, T, 1, 2, Dh/2]
  # The halves as an axis of 2 and rotate-half as its reversal: the same products and
  # sums as concatenate([-x2, x1]), without a concatenate inside the elementwise loop.
  x32 = x.astype(jnp.float32).reshape(b, t, h, 2, dh // 2)
  out = x32 * cos + x32[..., ::-1, :] * sin
  return out.reshape(b, t, h, dh).astype(x.dtype)


class Attention(nn.Module):
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

  @nn.compact
  def __call__(self, x, rope, mask, cache, cache_index):
    """x float[B, T, D], rope (cos, sin) -> (float[B, T, D], updated layer cache or None)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)
    projections = [
        Dense((self.heads, self.head_dim), ('embed',), ('heads', 'head_dim'), name='q_proj',
              **kw),
        Dense((self.kv_heads, self.head_dim), ('embed',), ('kv_heads', 'head_dim'),
              name='k_proj', **kw),
        Dense((self.kv_heads, self.head_dim), ('embed',), ('kv_heads', 'head_dim'),
              name='v_proj', **kw)]
    if self.fuse_projections:
      q, k, v = layers.fused_dense(x, projections, split_axis=1)  # on the heads axis
    else:
      q, k, v = (p(x) for p in projections)
    if self.qk_norm:  # per head, before RoPE (as Qwen3's q_norm / k_norm)
      norm_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      q = RMSNorm(self.norm_eps, axes=('head_dim',), name='q_norm', **norm_kw)(q)
      k = RMSNorm(self.norm_eps, axes=('head_dim',), name='k_norm', **norm_kw)(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'act_heads', None))
    q, k, v = checkpoint_name(q, 'query'), checkpoint_name(k, 'key'), checkpoint_name(v, 'value')
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype),
                                              cache_index, axis=1)
      new_cache = {'k': k, 'v': v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    out = kernels.attention(self.attention_impl)(q, k, v, mask=mask, is_causal=mask is None)
    out = checkpoint_name(out, 'attn_out')
    out = Dense(x.shape[-1], ('heads', 'head_dim'), ('embed',), name='o_proj', **kw)(out)
    return out, new_cache


class MLP(nn.Module):
  mlp_dim: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  fuse_projections: bool = False
  matmul_impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)
    projections = [Dense(self.mlp_dim, ('embed',), ('mlp',), name='gate_proj', **kw),
                   Dense(self.mlp_dim, ('embed',), ('mlp',), name='up_proj', **kw)]
    if self.fuse_projections:
      gate, up = layers.fused_dense(x, projections, split_axis=1)
    else:
      gate, up = (p(x) for p in projections)
    # SiLU in float32, rounded once to the compute dtype, as torch's bfloat16 kernel does
    # (not once per neg / exp / add / divide); the product stays in the compute dtype.
    act = jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)
    h = nn.with_logical_constraint(act * up, ('batch', 'length', 'act_mlp'))
    h = checkpoint_name(h, 'mlp_hidden')
    return Dense(x.shape[-1], ('mlp',), ('embed',), name='down_proj', **kw)(h)


class DecoderBlock(nn.Module):
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

  @nn.compact
  def __call__(self, x, rope, mask, cache, cache_index):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = checkpoint_name(RMSNorm(self.norm_eps, name='input_layernorm', **kw)(x), 'normed')
    h, new_cache = Attention(self.heads, self.kv_heads, self.head_dim,
                             attention_impl=self.attention_impl, matmul_impl=self.matmul_impl,
                             fuse_projections=self.fuse_projections, qk_norm=self.qk_norm,
                             norm_eps=self.norm_eps, name='self_attn',
                             **kw)(h, rope, mask, cache, cache_index)
    x = x + h
    h = checkpoint_name(RMSNorm(self.norm_eps, name='post_attention_layernorm', **kw)(x),
                        'normed')
    x = x + MLP(self.mlp_dim, fuse_projections=self.fuse_projections,
                matmul_impl=self.matmul_impl, name='mlp', **kw)(h)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return x, new_cache


class Decoder(nn.Module):
  """LLaMA-style causal decoder with `embed` and `__call__` methods."""
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
                    matmul_impl=self.matmul_impl)
    block = layers.stack_blocks(
        DecoderBlock, depth=self.depth, scan=self.scan_layers, remat_policy=self.remat_policy,
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))
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
    self.norm = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.tie_embeddings:
      self.lm_head = Dense(self.vocab_size, ('embed',), ('vocab',), dtype=self.dtype,
                           param_dtype=self.param_dtype, matmul_impl=self.matmul_impl)

  def _to_compute_dtype(self, variables):
    return jax.tree.map(lambda v: v.astype(self.dtype), variables)

  def embed(self, input_ids):
    """int[B, T] -> float[B, T, D]."""
    x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

  def __call__(self, x, positions=None, attention_mask=None, cache=None, cache_index=None,
               logit_positions=None):
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

    Returns:
      (logits float[B, T, V] (or [B, P, V]), updated cache or None).
    """
    b, t, _ = x.shape
    if cache is not None and cache_index is None:
      cache_index = jnp.zeros((), jnp.int32)
    start = 0 if cache is None else cache_index
    if positions is None:
      if cache is None:  # static: numpy, so the RoPE tables are constants
        positions = np.arange(t, dtype=np.int32)[None]
      else:
        positions = (start + jnp.arange(t, dtype=jnp.int32))[None]
    rope = rope_tables(positions, rope_inv_freq(
        self.resolved_head_dim, self.rope_theta,
        dict(self.rope_scaling) if self.rope_scaling else None))
    mask = None
    if cache is not None or attention_mask is not None:
      s = t if cache is None else cache['k'].shape[2]
      query_slot = start + jnp.arange(t)[:, None]
      mask = (jnp.arange(s)[None, :] <= query_slot)[None, None]  # [1, 1, T, S]
      if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].astype(bool)
    if self.scan_layers:
      x, new_cache = self.layers(x, rope, mask, cache, cache_index)
    else:
      new_layers = []
      for i, block in enumerate(self.layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
        x, layer_cache = block(x, rope, mask, layer_cache, cache_index)
        new_layers.append(layer_cache)
      new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *new_layers)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    x = self.norm(x)
    if self.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x, self.embed_tokens.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'act_vocab'))
    return logits, new_cache

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
    """Zeros {'k','v': [L, B, S, K, Dh]} (callable unbound: it reads only fields)."""
    shape = (self.depth, batch_size, max_len, self.kv_heads, self.resolved_head_dim)
    dtype = dtype or self.dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def build_llama(model_config, impls: kernels.Impls) -> Decoder:
  """The decoder of `model_config` (the full `config.model`), with the resolved kernels."""
  d = model_config.decoder
  scaling = d.rope_scaling
  scaling = tuple(sorted(dict(scaling).items())) if scaling else None
  return Decoder(
      vocab_size=d.vocab_size, width=d.width, depth=d.depth, heads=d.heads,
      kv_heads=d.kv_heads, mlp_dim=d.mlp_dim, head_dim=d.head_dim, rope_theta=d.rope_theta,
      rope_scaling=scaling, norm_eps=d.norm_eps, tie_embeddings=d.tie_embeddings,
      dtype=layers.dtype(model_config.dtype), param_dtype=layers.dtype(model_config.param_dtype),
      scan_layers=model_config.scan_layers, remat_policy=model_config.remat_policy,
      attention_impl=impls.attention, matmul_impl=impls.matmul,
      precast_weights=model_config.precast_weights,
      fuse_projections=model_config.fuse_projections, qk_norm=d.qk_norm)


def check_llama(config, problems: registry.Problems):
  """`model.decoder`'s own faults: sizes, grouped-query heads, the head width, and the
  image and padding token ids against the vocabulary."""
  d = config.model.decoder
  checks.positive_ints(problems, d, 'model.decoder',
                       ('vocab_size', 'width', 'depth', 'heads', 'kv_heads', 'mlp_dim'))
  if checks.all_positive(d, ('heads', 'kv_heads')) and d.heads % d.kv_heads:
    problems.add('model.decoder.kv_heads', f'heads {d.heads} is not a multiple of kv_heads '
                 f'{d.kv_heads} (grouped-query attention)',
                 'pick kv_heads dividing model.decoder.heads')
  if checks.all_positive(d, ('width', 'heads')) and not d.get('head_dim') and d.width % d.heads:
    problems.add('model.decoder.heads', f'width {d.width} is not divisible by heads {d.heads} '
                 'and head_dim is 0 (derived)', 'pick heads dividing the width, or set '
                 'model.decoder.head_dim')
  vocab = d.get('vocab_size')
  if isinstance(vocab, int):
    ids = {key: config.model.get(key) for key in ('image_token_id', 'pad_token_id')}
    for key, tid in ids.items():
      if not isinstance(tid, int) or not 0 <= tid < vocab:
        problems.add(f'model.{key}', f'{tid!r} is outside the vocabulary [0, {vocab})',
                     f'use an id below model.decoder.vocab_size={vocab}, or grow the vocabulary')
    if ids['image_token_id'] == ids['pad_token_id']:
      problems.add('model.pad_token_id', 'equals model.image_token_id', 'give padding its own id')


registry.DECODER.register('llama', build_llama, check=check_llama)
