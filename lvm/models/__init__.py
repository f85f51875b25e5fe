"""Model families and `build(model_config)`, the one place configs become modules."""

import copy

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm.models.decoder import Decoder
from lvm.models.layout import stack_layers, unstack_layers
from lvm.models.llava import LLaVA
from lvm.models.projector import Projector, tokens_out
from lvm.models.vision import VisionTower

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype(name):
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; known: {sorted(DTYPES)}')
  return DTYPES[name]


def feature_layers(vision_config) -> tuple[int, ...]:
  layer = vision_config.feature_layer
  return tuple(int(i) for i in layer) if isinstance(layer, (list, tuple)) else (int(layer),)


def build_vision(config) -> VisionTower:
  """config: the full `config.model`."""
  v = config.vision
  if v.kind not in ('clip', 'siglip'):
    raise ValueError(f"model.vision.kind must be 'clip' or 'siglip', got {v.kind!r}")
  return VisionTower(
      kind=v.kind, image_size=v.image_size, patch_size=v.patch_size, width=v.width,
      depth=v.depth, heads=v.heads, mlp_dim=v.mlp_dim, norm_eps=v.norm_eps,
      feature_layers=feature_layers(v), select=v.select, dtype=dtype(config.dtype),
      param_dtype=dtype(config.param_dtype), scan_layers=config.scan_layers,
      remat_policy=config.remat_policy, attention_impl=config.attention_impl)


def build_decoder(config) -> Decoder:
  d = config.decoder
  if d.kind != 'llama':
    raise ValueError(f"model.decoder.kind must be 'llama', got {d.kind!r}")
  scaling = d.rope_scaling
  scaling = tuple(sorted(dict(scaling).items())) if scaling else None
  return Decoder(
      vocab_size=d.vocab_size, width=d.width, depth=d.depth, heads=d.heads,
      kv_heads=d.kv_heads, mlp_dim=d.mlp_dim, head_dim=d.head_dim, rope_theta=d.rope_theta,
      rope_scaling=scaling, norm_eps=d.norm_eps, tie_embeddings=d.tie_embeddings,
      dtype=dtype(config.dtype), param_dtype=dtype(config.param_dtype),
      scan_layers=config.scan_layers, remat_policy=config.remat_policy,
      attention_impl=config.attention_impl,
      precast_weights=config.get('precast_weights', True),
      fuse_projections=config.get('fuse_projections', False), qk_norm=d.get('qk_norm', False))


def build(config) -> LLaVA:
  """The LLaVA module for `config.model` (or a full config holding `.model`)."""
  config = config.model if 'model' in config else config
  return LLaVA(
      vision=build_vision(config),
      projector=Projector(kind=config.projector.kind, width=config.decoder.width,
                          bias=config.projector.get('bias', True), dtype=dtype(config.dtype),
                          param_dtype=dtype(config.param_dtype)),
      decoder=build_decoder(config),
      image_token_id=config.image_token_id)


def num_image_tokens(config) -> int:
  """Visual tokens per image for `config.model` (what the data pipeline must expand to)."""
  config = config.model if 'model' in config else config
  return tokens_out(config.projector.kind, build_vision(config).num_tokens)


def abstract_params(config, scan_layers: bool | None = None) -> dict:
  """'/'-joined path -> jax.ShapeDtypeStruct of every parameter; allocates nothing.

  `scan_layers` overrides the config's layout (True: stacked `layers`, False: `layers_i`).
  """
  config = copy.deepcopy(config.model if 'model' in config else config)
  if scan_layers is not None:
    config.scan_layers = scan_layers
  model = build(config)
  v = config.vision
  images = jax.ShapeDtypeStruct((1, 1, v.image_size, v.image_size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda i, t: model.init(jax.random.PRNGKey(0), i, t), images, ids)
  return traverse_util.flatten_dict(nn.unbox(shapes['params']), sep='/')


def random_params(config, rng, images, input_ids) -> dict:
  """Random params of `build(config)`, unboxed; traced, so call it under `jax.jit`.

  An unrolled model (`scan_layers` False) is initialized as its scanned twin, then split
  by layer: the same weights for a seed in either layout, and one vectorized init for XLA
  to compile instead of one per layer (for the 2.4B LLaVA of benchmarks/configs/
  gpu_llava15.py, unrolled, 11 s of compiling on the CPU instead of 54 s).
  """
  if config.scan_layers:
    return nn.unbox(build(config).init(rng, images, input_ids)['params'])
  twin = copy.deepcopy(config)
  twin.scan_layers = True
  stacked = nn.unbox(build(twin).init(rng, images, input_ids)['params'])
  flat = unstack_layers(traverse_util.flatten_dict(stacked, sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


__all__ = ['abstract_params', 'build', 'num_image_tokens', 'random_params', 'stack_layers',
           'unstack_layers', 'LLaVA', 'VisionTower', 'Projector', 'Decoder']
