"""The sharded train state: abstract first, then created straight into its shardings.

`StateFactory` traces the model's init with `jax.eval_shape`, derives every leaf's
NamedSharding from its logical axis names, and jits the creation of parameters and
optimizer state with those shardings out, so no full copy ever lands on one device.
`initial_params` starts them as `config.init` says (random, a checkpoint, transformers).
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm import checkpoint as ckpt_lib
from lvm import lora
from lvm import models
from lvm import optim
from lvm import quantize
from lvm import sharding
from lvm import validate


def dummy_inputs(config, batch_size: int):
  """Zero images float[B, N, H, W, 3] (or None) and ids int[B, L] for tracing init.

  An anyres model gets one zero tile per slot, float[B, N, 1, H, W, 3], and the keyword
  `image_sizes` int[B, N, 2] of zeros (absent images: its parameters do not depend on them)
  as a third element.
  """
  v = config.model.vision
  n = int(config.data.max_images)
  anyres = bool(config.model.anyres.pinpoints)
  tiles = (1,) if anyres else ()
  images = (jnp.zeros((batch_size, n, *tiles, v.image_size, v.image_size, 3), jnp.float32)
            if n else None)
  ids = jnp.zeros((batch_size, config.data.seq_len), jnp.int32)
  if anyres:
    return images, ids, jnp.zeros((batch_size, n, 2), jnp.int32)
  return images, ids


def opt_state_shardings(abstract_opt, params, param_shardings, replicated):
  """Shardings of an optimizer state: a leaf shaped like a parameter takes its sharding.

  A leaf is matched to a parameter by the parameter-tree keys its path ends with (Adam's
  `mu/decoder/layers/...`, also inside `multi_transform`'s per-label states) and by shape;
  counts and other leaves are replicated. (`optax.tree_map_params` cannot be used: it calls
  `multi_transform`'s label function on a placeholder instead of the parameters.)
  """
  flat_params = {tuple(k.key for k in path): (leaf.shape, sh) for (path, leaf), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))}

  def sharding_of(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for start in range(len(keys)):
      shape_sharding = flat_params.get(tuple(keys[start:]))
      if shape_sharding is not None and shape_sharding[0] == leaf.shape:
        return shape_sharding[1]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class StateFactory:
  """Abstract-first sharded train state for one config, mesh and optimizer.

  Attributes:
    param_shardings, shardings: NamedSharding trees for the state's params and the whole state.
    abstract: the state as `jax.ShapeDtypeStruct`s carrying their shardings.
    quantized_axes: {path: contraction axes} of the frozen kernels the state stores
      quantized (`lvm.quantize`; empty unless `train.frozen_quantization` is set).
    quantize: float params -> the params as the state stores them.
  """

  def __init__(self, config, model, tx, mesh, axis_rules):
    self.config, self.model, self.tx, self.mesh = config, model, tx, mesh
    self.rules = axis_rules
    self.trainable = lora.trainable_regex(config)  # with LoRA: adapters (+ train_full)
    batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    inputs = dummy_inputs(config, batch)

    def init_boxed(rng):
      return model.init(rng, *inputs[:2], image_sizes=inputs[2] if inputs[2:] else None)['params']

    self._init_inputs = inputs
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    self.param_shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
    abstract_params = nn.unbox(boxed)
    # A stage that trains nothing fails here, before any compile, naming the key and fix.
    validate.validate_trainable(config, abstract_params)
    # Frozen Dense kernels may be stored in int8/int4 (config.train.frozen_quantization).
    self._float_abstract = _with_shardings(abstract_params, self.param_shardings)
    self._float_shardings, mode = self.param_shardings, config.train.frozen_quantization
    self.quantized_axes = quantize.axes_tree(boxed, self.trainable, mode)
    self.quantize = functools.partial(quantize.quantize_params, axes=self.quantized_axes,
                                      mode=mode)
    abstract_params = jax.eval_shape(self.quantize, abstract_params)
    self.param_shardings = quantize.quantized_shardings(self.param_shardings,
                                                        self.quantized_axes)
    trainable, _ = optim.split(abstract_params, self.trainable)
    trainable_shardings, _ = optim.split(self.param_shardings, self.trainable)
    abstract_opt = jax.eval_shape(tx.init, trainable)
    rep = sharding.replicated(mesh)
    opt_shardings = opt_state_shardings(abstract_opt, trainable, trainable_shardings, rep)
    self.shardings = {'step': rep, 'params': self.param_shardings, 'opt_state': opt_shardings}
    abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
                'opt_state': abstract_opt}
    self.abstract = _with_shardings(abstract, self.shardings)

  @property
  def abstract_params(self):
    """The model's (float) params, as `random_params` makes and checkpoints load them."""
    return self._float_abstract

  @property
  def saves_base(self) -> bool:
    """Whether checkpoints hold every parameter (else only the trainable ones: LoRA)."""
    return lora.saves_base(self.config)

  def to_checkpoint(self, state):
    """What a checkpoint holds of `state`: all of it, or (LoRA, `config.lora.save_base`
    off) its params cut to the trainable ones; the frozen base is `config.init`'s."""
    if self.saves_base:
      return state
    return {**state, 'params': optim.split(state['params'], self.trainable)[0]}

  @property
  def checkpoint_abstract(self):
    """`to_checkpoint` of the abstract state: what `restore` reads."""
    return self.to_checkpoint(self.abstract)

  def from_checkpoint(self, saved, log=print):
    """The train state from a restored `to_checkpoint(state)`: the frozen base rebuilt
    from `config.init` (deterministic) under the saved trainable parameters."""
    if self.saves_base:
      return saved
    base = optim.split(initial_params(self.config, self, log), self.trainable)[1]
    params = optim.merge(saved['params'], base)
    if self.quantized_axes:  # the rebuilt base is float; train.frozen_quantization stores it so
      with jax.set_mesh(self.mesh):
        params = jax.jit(self.quantize, out_shardings=self.param_shardings)(params)
    return {**saved, 'params': params}

  def random_params(self, rng):
    """Randomly initialized params, created directly in their shardings."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(lambda r: models.random_params(self.config, r, *self._init_inputs),
                     out_shardings=self._float_shardings)(rng)

  def from_params(self, params):
    """A fresh state (step 0, new optimizer state) around the given params."""
    def make(p):
      return {'step': jnp.zeros((), jnp.int32), 'params': self.quantize(p),
              'opt_state': self.tx.init(optim.split(p, self.trainable)[0])}
    return jax.jit(make, in_shardings=(self._float_shardings,), out_shardings=self.shardings,
                   donate_argnums=(0,))(params)


def overlay_params(base, loaded, source: str):
  """Replaces leaves of `base` by those of `loaded` (same paths, same shapes).

  Returns:
    (params, number of leaves taken from `loaded`).
  """
  base_flat, loaded_flat = optim.flatten(base), optim.flatten(loaded)
  unknown = sorted(set(loaded_flat) - set(base_flat))
  if unknown:
    raise ValueError(f'{source}: {len(unknown)} parameters do not exist in this model '
                     f'(e.g. {unknown[:3]}); check config.model against that checkpoint.')
  for key, value in loaded_flat.items():
    if tuple(value.shape) != tuple(base_flat[key].shape):
      raise ValueError(f'{source}: parameter {key} has shape {tuple(value.shape)} but '
                       f'config.model gives {tuple(base_flat[key].shape)}.')
  out = dict(base_flat)
  for key, value in loaded_flat.items():
    out[key] = jax.device_put(jnp.asarray(value, base_flat[key].dtype), base_flat[key].sharding)
  return optim.unflatten(out), len(loaded_flat)


def initial_params(config, factory: StateFactory, log: Callable[[str], None] = print):
  """Parameters to start from, as `config.init.kind` says (random | hf | hf_parts | checkpoint)."""
  init = config.init
  rng = jax.random.key(config.train.seed)
  params = factory.random_params(rng)
  if init.kind == 'random':
    return params
  if init.kind == 'checkpoint':
    if not init.path:
      raise ValueError('config.init.kind="checkpoint" needs config.init.path: an earlier '
                       "run's workdir or checkpoint step folder.")
    # Restore only the leaves this model has, straight into this mesh's shardings.
    _, loaded = ckpt_lib.load_params(init.path, factory.abstract_params)
    params, count = overlay_params(params, loaded, f'config.init.path={init.path!r}')
  elif init.kind == 'hf':
    from lvm import hf  # pylint: disable=import-outside-toplevel
    _, loaded = hf.load(init.path, scan_layers=config.model.scan_layers)
    params, count = overlay_params(params, loaded, f'config.init.path={init.path!r}')
  elif init.kind == 'hf_parts':
    from lvm import hf  # pylint: disable=import-outside-toplevel
    m = config.model
    _, loaded = hf.assemble(
        init.vision_path, init.decoder_path, projector=m.projector.kind,
        feature_layer=m.vision.feature_layer, select=m.vision.select,
        image_token_id=m.image_token_id, pad_token_id=m.pad_token_id,
        vocab_size=m.decoder.vocab_size, scan_layers=m.scan_layers)
    # The projector is new in stage 1: keep its random init.
    loaded = {k: v for k, v in loaded.items() if k != 'projector'}
    params, count = overlay_params(params, loaded, 'config.init.vision_path/decoder_path')
  else:
    raise ValueError(f"config.init.kind must be 'random', 'hf', 'hf_parts' or 'checkpoint', "
                     f'got {init.kind!r}')
  log(f'init: {count} parameter arrays from {init.kind} '
      f'({len(optim.flatten(params)) - count} left at random init)')
  return params
