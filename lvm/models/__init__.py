"""Model families and `build(model_config)`, the one place configs become modules.

The vision towers, projectors and decoder families register themselves in their modules
(`lvm.registry.VISION`, `PROJECTOR`, `DECODER`), imported here so the registries find
them; `build` looks the configured kinds up there and resolves the kernels once.
"""

import copy

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm import kernels
from lvm import lora
from lvm import registry
from lvm.models import anyres_model
from lvm.models import families as _families  # noqa: F401  (registers the decoder families)
from lvm.models import projector as _projector  # noqa: F401  (registers the projectors)
from lvm.models import vision as _vision  # noqa: F401  (registers 'clip', 'siglip')
from lvm.models.decoder import Decoder
from lvm.models.layers import DTYPES, dtype
from lvm.models.layout import stack_layers, unstack_layers
from lvm.models.llava import LLaVA
from lvm.models.projector import Projector
from lvm.models.vision import VisionTower, feature_layers


def _model(config):
  return config.model if 'model' in config else config


def build_vision(config, impls: kernels.Impls | None = None) -> nn.Module:
  """The vision tower of `config.model` (or a full config); `impls`: resolved kernels
  (default: `kernels.resolve_impls` of the config)."""
  config = _model(config)
  impls = impls or kernels.resolve_impls(config)
  return registry.VISION.get(config.vision.kind).obj(config, impls)


def build_projector(config, impls: kernels.Impls | None = None) -> nn.Module:
  """The projector of `config.model` (or a full config); `impls` as in `build_vision`."""
  config = _model(config)
  impls = impls or kernels.resolve_impls(config)
  return registry.PROJECTOR.get(config.projector.kind).obj(config, impls)


def build_decoder(config, impls: kernels.Impls | None = None) -> nn.Module:
  """The decoder of `config.model` (or a full config); `impls` as in `build_vision`."""
  config = _model(config)
  impls = impls or kernels.resolve_impls(config)
  return registry.DECODER.get(config.decoder.kind).obj(config, impls)


def build(config, backend: str | None = None) -> LLaVA:
  """The LLaVA module for `config.model` (or a full config holding `.model`, whose
  `config.lora` then adds LoRA adapters: `lvm.lora`).

  Each part is built by the kind its config names (a registry lookup); 'auto' kernels
  resolve here, once, for `backend` (default: the default device's; see `lvm.kernels`).
  """
  adapters = lora.spec(config)  # a full config's `lora` group (a model config has none)
  config = _model(config)
  impls = kernels.resolve_impls(config, backend)
  return LLaVA(vision=build_vision(config, impls), projector=build_projector(config, impls),
               decoder=build_decoder(config, impls), image_token_id=config.image_token_id,
               anyres=anyres_model.layout(config), lora=adapters)


def num_image_tokens(config, image_size=None) -> int:
  """Visual tokens of an image for `config.model` (what the data pipeline must expand to).

  Args:
    config: the model config (or a full config).
    image_size: the image's original (height, width); required by an anyres model
      (`model.anyres.pinpoints` set), whose count depends on it (transformers' processor
      count); a fixed-size model resizes every image and ignores it.
  """
  config = _model(config)
  layout = anyres_model.layout(config)
  if layout is not None:
    if image_size is None:
      raise ValueError('an anyres model (model.anyres.pinpoints set) gives each image a number '
                       'of tokens that depends on its size: pass image_size=(height, width)')
    return layout.num_image_tokens(image_size)
  impls = kernels.Impls(matmul='xla', attention='xla')  # the count depends on no kernel
  return build_projector(config, impls).tokens_out(build_vision(config, impls).num_tokens)


def max_image_tokens(config) -> int:
  """The most visual tokens any one image takes: `num_image_tokens` for a fixed-size model,
  the static packed length over all image sizes for an anyres one."""
  config = _model(config)
  layout = anyres_model.layout(config)
  return num_image_tokens(config) if layout is None else layout.max_len


def example_inputs(config):
  """Zero inputs that `build(config).init` accepts: (images, input_ids, kwargs).

  images float32[1, 1, H, W, 3] (anyres: [1, 1, T, H, W, 3] with image_sizes (0, 0) in the
  kwargs, an absent image), input_ids int32[1, 8] of zeros.
  """
  config = _model(config)
  h = config.vision.image_size
  if anyres_model.layout(config) is None:
    return jnp.zeros((1, 1, h, h, 3), jnp.float32), jnp.zeros((1, 8), jnp.int32), {}
  t = anyres_model.num_tiles(config)
  return (jnp.zeros((1, 1, t, h, h, 3), jnp.float32), jnp.zeros((1, 8), jnp.int32),
          {'image_sizes': jnp.zeros((1, 1, 2), jnp.int32)})


def abstract_params(config, scan_layers: bool | None = None) -> dict:
  """'/'-joined path -> jax.ShapeDtypeStruct of every parameter; allocates nothing.

  `scan_layers` overrides the config's layout (True: stacked `layers`, False: `layers_i`).
  """
  config = copy.deepcopy(config.model if 'model' in config else config)
  if scan_layers is not None:
    config.scan_layers = scan_layers
  model = build(config)
  v = config.vision
  tiles = (anyres_model.num_tiles(config),) if model.anyres is not None else ()
  images = jax.ShapeDtypeStruct((1, 1, *tiles, v.image_size, v.image_size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  sizes = jnp.zeros((1, 1, 2), jnp.int32) if tiles else None  # an absent image: no tokens
  shapes = jax.eval_shape(
      lambda i, t: model.init(jax.random.PRNGKey(0), i, t, image_sizes=sizes), images, ids)
  return traverse_util.flatten_dict(nn.unbox(shapes['params']), sep='/')


def random_params(config, rng, images, input_ids, image_sizes=None) -> dict:
  """Random params of `build(config)`, unboxed; traced, so call it under `jax.jit`.

  `config` is the model config, or a full one (whose `lora` group adds adapters).

  An anyres model takes tiles `images float[B, N, T, H, W, 3]` with `image_sizes int[B, N, 2]`
  (all (0, 0) is fine: the parameters do not depend on the sizes).

  An unrolled model (`scan_layers` False) is initialized as its scanned twin, then split
  by layer: the same weights for a seed in either layout, and one vectorized init for XLA
  to compile instead of one per layer (for the 2.4B LLaVA of benchmarks/configs/
  gpu_llava15.py, unrolled, 11 s of compiling on the CPU instead of 54 s).
  """
  kw = {} if image_sizes is None else {'image_sizes': image_sizes}
  if _model(config).scan_layers:
    return nn.unbox(build(config).init(rng, images, input_ids, **kw)['params'])
  twin = copy.deepcopy(config)
  _model(twin).scan_layers = True
  stacked = nn.unbox(build(twin).init(rng, images, input_ids, **kw)['params'])
  flat = unstack_layers(traverse_util.flatten_dict(stacked, sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


__all__ = ['abstract_params', 'build', 'example_inputs', 'build_decoder', 'build_projector', 'build_vision',
           'dtype', 'feature_layers', 'max_image_tokens', 'num_image_tokens', 'random_params',
           'stack_layers', 'unstack_layers', 'DTYPES', 'LLaVA', 'VisionTower', 'Projector',
           'Decoder']
