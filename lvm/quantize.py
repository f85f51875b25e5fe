"""Frozen base weights stored in int8 or int4 (QLoRA-style), dequantized inside the step.

`config.train.frozen_quantization` ('none' | 'int8' | 'int4') replaces every *frozen*
Dense kernel of the train state (a path ending in `/kernel` that the stage's trainable
regex does not match: the vision tower; the decoder in stage 1; LoRA's base weights) by a
`QArray`: integer values plus one float32 absmax scale per output channel, reduced over
the kernel's contraction axes. `lvm.models.layers.Dense` dequantizes its kernel where it
reads it, so under `nn.scan` only one layer's float weights exist at a time (XLA may fuse
the multiply into the matmul's operand). Frozen leaves are never differentiated (the step
takes gradients of the trainable subtree only) and carry no optimizer state, so a
quantized leaf costs its integer bytes plus its scales and nothing else.

Norms, biases, embeddings and the patch embedding stay in their float dtype: they are a
few percent of the parameters, and embeddings are read by gather, not matmul.

Why our own ~100 lines and not qwix or AQT: both quantize by intercepting the model's
matmuls (qwix's `quantize_model` rewrites a linen model's `dot_general`s; AQT replaces the
dot), which here would have to reach inside `nn.scan`, `nn.remat` and the fused q/k/v and
gate/up projections and the registered matmul kernels, and would key the choice of
quantized weights on module paths rather than on what the stage freezes. Weight-only
quantization of frozen weights needs none of that: a pytree node in the params tree,
quantized once when the state is made, and one `dequantize` where Dense reads its kernel.
"""

import re

import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

MODES = ('none', 'int8', 'int4')
_DTYPES = {'int8': jnp.int8, 'int4': jnp.int4}
# The logical axis names of a Dense kernel's contraction axes when they are not the first
# axis alone: attention output projections contract over (heads, head_dim).
_HEADS_IN = ('heads', 'head_dim')


@flax.struct.dataclass
class QArray:
  """A quantized weight: `values * scale`.

  Attributes:
    values: int8 or int4[...], the weight's shape.
    scale: float32[...], the weight's rank, size 1 on the contraction axes.
  """
  values: jax.Array
  scale: jax.Array

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  def dequantize(self, dtype=jnp.float32):
    """The weight as floats (float32 product, cast to `dtype`)."""
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def dequantize(x, dtype=jnp.float32):
  """`x.dequantize(dtype)` for a `QArray`, else `x` unchanged (a float parameter)."""
  return x.dequantize(dtype) if isinstance(x, QArray) else x


def dequantize_params(params, dtype):
  """The params with every `QArray` leaf dequantized to `dtype`."""
  return jax.tree.map(lambda x: dequantize(x, dtype), params,
                      is_leaf=lambda x: isinstance(x, QArray))


def contraction_axes(names) -> tuple[int, ...]:
  """The axes a Dense kernel with these logical axis names sums over in its matmul.

  Scanned kernels lead with 'layers' (one scale per layer). The contraction is the first
  other axis, or a leading ('heads', 'head_dim') pair (attention output projections).
  """
  names = tuple(names)
  first = 1 if names and names[0] == 'layers' else 0
  if names[first:first + 2] == _HEADS_IN:
    return (first, first + 1)
  return (first,)


def quantize(w, mode: str, axes: tuple[int, ...]) -> QArray:
  """Symmetric absmax quantization of `w` with one scale per slice over `axes`."""
  dtype = _DTYPES[mode]
  qmax = jnp.iinfo(dtype).max
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(dtype)
  return QArray(values, scale)


def selected(path: str, trainable: str) -> bool:
  """Whether the parameter at `path` is quantized: a frozen Dense kernel."""
  return path.endswith('/kernel') and not re.search(trainable, path)


def axes_tree(boxed_params, trainable: str, mode: str) -> dict:
  """{path: contraction axes} of the leaves `mode` quantizes, from the boxed (logically
  partitioned) abstract params; empty for mode 'none'.

  Raises:
    ValueError: a quantization mode, but no frozen Dense kernel to apply it to.
  """
  if mode == 'none':
    return {}
  flat = traverse_util.flatten_dict(
      boxed_params, sep='/', is_leaf=lambda _, x: hasattr(x, 'names'))
  axes = {k: contraction_axes(v.names) for k, v in flat.items()
          if selected(k, trainable) and len(v.names) >= 2}
  if not axes:
    raise ValueError(f'config.train.frozen_quantization={mode!r}, but the trainable pattern '
                     f'{trainable!r} freezes no Dense kernel: nothing to quantize; set it '
                     "to 'none' or freeze a module (config.train.stage).")
  return axes


def quantize_params(params, axes: dict, mode: str):
  """The params with the leaves named in `axes` (see `axes_tree`) quantized."""
  if not axes:
    return params
  flat = traverse_util.flatten_dict(params, sep='/')
  out = {k: quantize(v, mode, axes[k]) if k in axes else v for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep='/')


def quantized_shardings(shardings, axes: dict):
  """The params' NamedShardings with each quantized leaf's as a QArray: the values keep
  the weight's sharding, the scales drop the (size-1) contraction axes from it."""
  if not axes:
    return shardings
  flat = traverse_util.flatten_dict(shardings, sep='/')

  def scale_sharding(s, reduced):
    spec = tuple(s.spec) + (None,) * (max(reduced) + 1 - len(s.spec))
    spec = tuple(None if i in reduced else a for i, a in enumerate(spec))
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))

  out = {k: QArray(s, scale_sharding(s, axes[k])) if k in axes else s
         for k, s in flat.items()}
  return traverse_util.unflatten_dict(out, sep='/')


def nbytes(tree) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs, int4 counted at 4 bits."""
  total = 0
  for x in jax.tree.leaves(tree):
    dt = jnp.dtype(x.dtype)
    width = jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else dt.itemsize * 8
    total += x.size * width // 8
  return total
