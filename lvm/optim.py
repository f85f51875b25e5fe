"""Optimizer, learning-rate schedules, trainable-parameter masks and per-module rates.

Parameters are addressed by their '/'-joined path (`decoder/layers/mlp/up_proj/kernel`).
Frozen parameters never reach the optimizer: `split` cuts the parameter tree into a
trainable and a frozen subtree, gradients are taken only for the trainable one, and the
optimizer state is built on that subtree alone, so frozen leaves carry no state.
"""

import math
import re
from typing import Any

import optax
from flax import traverse_util

# The trainable-parameter regex of each named stage (LLaVA-1.5: stage 1 trains the
# projector only, stage 2 the projector and the decoder with the vision tower frozen).
STAGES = {
    'pretrain': r'^projector/',
    'finetune': r'^(projector|decoder)/',
    'full': r'.*',
}

# Leaf names that get no weight decay: norm scales and biases.
NO_DECAY_LEAVES = ('bias', 'scale')


def trainable_key(train_config) -> str:
  """The config key that sets what trains, for error messages: `train.trainable` for stage
  'custom', else `train.stage`."""
  return 'train.trainable' if train_config.stage == 'custom' else 'train.stage'


def trainable_regex(train_config) -> str:
  """The regex over parameter paths that selects the trainable ones.

  Args:
    train_config: `config.train` (stage, trainable).

  Raises:
    ValueError: unknown stage, or stage 'custom' without a valid `train.trainable`.
  """
  stage = train_config.stage
  if stage in STAGES:
    return STAGES[stage]
  if stage != 'custom':
    raise ValueError(f'config.train.stage must be one of {sorted(STAGES)} or "custom", '
                     f'got {stage!r}')
  pattern = train_config.trainable
  if not pattern:
    raise ValueError('config.train.stage="custom" needs config.train.trainable: a regex over '
                     'parameter paths, e.g. "^projector/|^decoder/layers/".')
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.train.trainable={pattern!r} is not a valid regex: {e}') from e
  return pattern


def flatten(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: dict[str, Any]):
  return traverse_util.unflatten_dict(flat, sep='/')


def split(params, regex: str) -> tuple[dict, dict]:
  """Splits a parameter tree into (trainable, frozen) nested dicts by path regex."""
  pattern = re.compile(regex)
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if pattern.search(k)}
  frozen = {k: v for k, v in flat.items() if not pattern.search(k)}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable, frozen) -> dict:
  """Inverse of `split`."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def warmup_steps(opt_config, total_steps: int) -> int:
  if opt_config.warmup_steps > 0:
    return int(opt_config.warmup_steps)
  return int(round(opt_config.warmup_ratio * total_steps))


def schedule(opt_config, total_steps: int, peak_lr: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine / linear decay or constant.

  Decay ends at `peak * end_lr_ratio` at `total_steps`.
  """
  peak = float(opt_config.lr if peak_lr is None else peak_lr)
  warmup = min(warmup_steps(opt_config, total_steps), max(total_steps, 1))
  end = peak * float(opt_config.end_lr_ratio)
  decay_steps = max(total_steps - warmup, 1)
  kind = opt_config.schedule
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_config.end_lr_ratio)
  elif kind == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule must be 'cosine', 'linear' or 'constant', "
                     f'got {kind!r}')
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """True on leaves that get weight decay (not norm scales nor biases)."""
  flat = flatten(params)
  return unflatten({k: k.rsplit('/', 1)[-1] not in NO_DECAY_LEAVES for k in flat})


def module_labels(module_lr: dict, params) -> dict:
  """Labels each leaf with the first `module_lr` regex its path matches, else 'default'."""
  patterns = [(name, re.compile(name)) for name in module_lr]

  def label(path):
    for name, pattern in patterns:
      if pattern.search(path):
        return name
    return 'default'

  return unflatten({k: label(k) for k in flatten(params)})


def _adamw(opt_config, lr) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                     weight_decay=opt_config.weight_decay, mask=decay_mask)


def make(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for the trainable subtree, and the base learning-rate schedule.

  Global-norm clipping runs first, on the whole trainable gradient. `module_lr` maps
  path regexes to peak learning rates (same schedule shape, scaled peak); the first
  matching regex wins, other leaves use `lr`.

  Args:
    opt_config: `config.optimizer`.
    total_steps: number of optimizer steps of the run (for decay and warmup ratio).
  """
  if opt_config.name != 'adamw':
    raise ValueError(f"config.optimizer.name must be 'adamw', got {opt_config.name!r}")
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}')
  base = schedule(opt_config, total_steps)
  module_lr = dict(opt_config.module_lr or {})
  for name, lr in module_lr.items():
    try:
      re.compile(name)
    except re.error as e:
      raise ValueError(f'config.optimizer.module_lr key {name!r} is not a valid regex: {e}') from e
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
      raise ValueError(f'config.optimizer.module_lr[{name!r}] must be a learning rate >= 0, '
                       f'got {lr!r}')
  if module_lr:
    transforms = {'default': _adamw(opt_config, base)}
    for name, lr in module_lr.items():
      transforms[name] = _adamw(opt_config, schedule(opt_config, total_steps, lr))
    inner = optax.multi_transform(transforms, lambda p: module_labels(module_lr, p))
  else:
    inner = _adamw(opt_config, base)
  parts = [inner]
  if opt_config.clip_norm and opt_config.clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(opt_config.clip_norm))
  return optax.chain(*parts), base
