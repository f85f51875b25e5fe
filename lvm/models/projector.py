"""Projectors: vision features float[B, P, Dv] -> visual tokens float[B, P', D].

The kinds (linear, mlp{k}x_{act}, downsample_mlp, identity) register here
(`lvm.registry.PROJECTOR`).
"""

import re

import flax.linen as nn
import jax.numpy as jnp

from lvm import kernels
from lvm import registry
from lvm.models import layers
from lvm.models.layers import Dense

_MLP_KIND = re.compile(r'^mlp(\d+)x_(\w+)$')


def parse_kind(kind: str) -> tuple[str, int, str]:
  """'mlp2x_gelu' -> ('mlp', 2, 'gelu'); 'linear' -> ('mlp', 1, ''); others pass through."""
  if kind == 'linear':
    return 'mlp', 1, ''
  m = _MLP_KIND.match(kind)
  if m:
    depth, act = int(m.group(1)), m.group(2)
    if depth < 1:
      raise ValueError(f'projector {kind!r}: depth must be >= 1')
    layers.activation(act)  # validates
    return 'mlp', depth, act
  if kind in ('identity', 'downsample_mlp'):
    return kind, 2, 'gelu'
  raise ValueError(f'Unknown projector kind {kind!r}; use linear, mlp{{k}}x_gelu, '
                   'downsample_mlp or identity')


def tokens_out(kind: str, num_tokens: int) -> int:
  """Visual tokens per image produced from `num_tokens` vision tokens."""
  if parse_kind(kind)[0] == 'downsample_mlp':
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens or side % 2:
      raise ValueError(f'downsample_mlp needs a square, even grid of tokens; got {num_tokens} '
                       "(use vision select='patch' to drop the class token)")
    return num_tokens // 4
  return num_tokens


class Projector(nn.Module):
  """LLaVA's multi_modal_projector and its variants.

  `mlp{k}x_{act}` is k linear layers with `act` between them (LLaVA-1.5: mlp2x_gelu,
  transformers' linear_1 / linear_2). `downsample_mlp` first folds each 2x2 patch
  neighbourhood into one token (pixel shuffle, 4x fewer tokens, 4x wider) and then
  applies mlp2x_gelu.
  """
  kind: str
  width: int  # decoder width D
  bias: bool = True
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  matmul_impl: str = 'xla'  # resolved (lvm.kernels)

  def tokens_out(self, num_tokens: int) -> int:
    """Visual tokens per image from `num_tokens` vision tokens (what LLaVA splices in)."""
    return tokens_out(self.kind, num_tokens)

  @nn.compact
  def __call__(self, x):
    family, depth, act = parse_kind(self.kind)
    if family == 'identity':
      if x.shape[-1] != self.width:
        raise ValueError(f'identity projector needs vision width == decoder width, got '
                         f'{x.shape[-1]} vs {self.width}')
      return x.astype(self.dtype)
    if family == 'downsample_mlp':
      b, p, d = x.shape
      side = int(round(p ** 0.5))
      tokens_out(self.kind, p)
      x = x.reshape(b, side // 2, 2, side // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, p // 4, 4 * d)
    for i in range(depth):
      # 'embed_in' is left unsharded so the square D x D kernel never names fsdp twice.
      x = Dense(self.width, ('embed_in',), ('embed',), use_bias=self.bias, dtype=self.dtype,
                param_dtype=self.param_dtype, matmul_impl=self.matmul_impl,
                name=f'linear_{i + 1}')(x)
      if i < depth - 1:
        x = layers.activation(act)(x)
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))


def build_projector(model_config, impls: kernels.Impls) -> Projector:
  """The projector of `model_config` (the full `config.model`) onto the decoder's width."""
  return Projector(kind=model_config.projector.kind, width=model_config.decoder.width,
                   bias=model_config.projector.bias, dtype=layers.dtype(model_config.dtype),
                   param_dtype=layers.dtype(model_config.param_dtype), matmul_impl=impls.matmul)


def check_projector(config, problems: registry.Problems):
  """`model.projector.kind` parses (an mlp's depth and activation)."""
  try:
    parse_kind(config.model.projector.kind)
  except (ValueError, TypeError) as e:
    problems.add('model.projector.kind', f'{e}',
                 "use 'linear', 'mlp2x_gelu' (LLaVA-1.5), 'downsample_mlp' or 'identity'")


for _name, _pattern in (('linear', None), ('mlp{k}x_{act}', _MLP_KIND.pattern[1:-1]),
                        ('downsample_mlp', None), ('identity', None)):
  registry.PROJECTOR.register(_name, build_projector, check=check_projector, pattern=_pattern)
