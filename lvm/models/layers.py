"""Leaf layers shared by the vision tower, projector and decoder.

Every parameter carries logical axis names; `dtype` is the compute dtype and
`param_dtype` the storage dtype. Norms and softmax run in float32.

Einsum letters: B batch, T query length, S key length, D model width, H heads,
K kv heads, G heads per kv head, Dh head width, F mlp width.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


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
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel = param_with_axes(self, 'kernel', self.kernel_init, (*in_shape, *features),
                             (*self.in_axes, *self.out_axes), self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', nn.initializers.zeros, features, self.out_axes,
                             self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalizes in float32, scales after casting back (as transformers)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',),
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


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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


def dot_product_attention(q, k, v, *, mask=None, is_causal=False, implementation='xla'):
  """Attention over q[B, T, H, Dh], k/v[B, S, K, Dh] (GQA when K < H) -> [B, T, H, Dh].

  `mask` is bool, broadcastable to [B, H, T, S]; True keeps a key.
  """
  impl = None if implementation in (None, 'auto') else implementation
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=impl)
