"""Leaf layers shared by the vision tower, projector and decoder.

Every parameter carries logical axis names; `dtype` is the compute dtype and
`param_dtype` the storage dtype. Norms and softmax run in float32. Matmuls and
attention run the kernels the config selects (`lvm.kernels`), named by module fields.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm import kernels
from lvm import quantize

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name: str) -> Dtype:
  """The jnp dtype of a config's dtype name (`model.dtype`, `model.param_dtype`)."""
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; known: {sorted(DTYPES)}')
  return DTYPES[name]


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
  matmul_impl: str = 'xla'  # a registered matmul kernel (lvm.kernels), resolved

  @nn.compact
  def __call__(self, x, *, kernel_only: bool = False):
    """x @ W; with `kernel_only`, W in the compute dtype instead (a caller concatenates
    several projections' kernels into one matmul, as `fused_dense` does)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel = param_with_axes(self, 'kernel', self.kernel_init, (*in_shape, *features),
                             (*self.in_axes, *self.out_axes), self.param_dtype)
    # A frozen kernel may be stored quantized (lvm.quantize): dequantized here, per layer.
    kernel = quantize.dequantize(kernel, self.dtype).astype(self.dtype)
    if kernel_only:
      if self.use_bias:
        raise ValueError('Dense(kernel_only=True) has no place for the bias')
      return kernel
    x = x.astype(self.dtype)
    y = kernels.matmul(self.matmul_impl)(x, kernel, n_in)
    if self.use_bias:
      bias = param_with_axes(self, 'bias', nn.initializers.zeros, features, self.out_axes,
                             self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def fused_dense(x, projections: Sequence[Dense], split_axis: int) -> list:
  """[p(x) for p in projections] as one matmul over their kernels concatenated on the
  output axis `split_axis` (counted in the kernel): one wide GEMM instead of several
  narrow ones. The parameters stay those of each projection."""
  weights = [p(x, kernel_only=True) for p in projections]
  n_in = len(projections[0].in_axes)
  matmul = kernels.matmul(projections[0].matmul_impl)
  y = matmul(x.astype(weights[0].dtype), jnp.concatenate(weights, axis=split_axis), n_in)
  sizes = [w.shape[split_axis] for w in weights]
  bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
  return jnp.split(y, bounds, axis=y.ndim - weights[0].ndim + split_axis)


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
    block_cls = nn.scan(block_cls, variable_axes={'params': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=in_axes, length=depth,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
  return block_cls
