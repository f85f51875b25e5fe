"""Config validation: every error a run can detect before it compiles, with the fix.

`validate_config(config, num_devices, num_processes)` checks the config alone (seconds,
no tracing, no compile); `validate_trainable(config, abstract_params)` checks the stage's
trainable pattern against the parameter tree (`jax.eval_shape` output, boxed or not).
Both raise one `ValueError` that lists every problem found, each line naming the config
key and how to fix it, so that a mistyped sweep fails at once instead of after a
compile or, worse, training the wrong thing.

The schema is `lvm.config.get_config()`. For each registry family (`FAMILIES`) the selected
kind must be registered, and its own `check` (registered beside it) runs; this module keeps no
list of kind names.
"""

import copy
import math
import re
from typing import Any

import flax.linen as nn
import ml_collections

from lvm import config as config_lib
from lvm import lora
from lvm import models
from lvm import optim
from lvm import quantize
from lvm import registry
from lvm import sharding
from lvm.data import feature_cache
from lvm.data import images
from lvm.data import length_groups
from lvm.data import loaders
from lvm.data import mixture
from lvm.data import packing

# The families whose kind a config selects; each kind brings its own `check`. A new kind is
# registered where it is implemented, never listed here.
FAMILIES = (registry.VISION, registry.PROJECTOR, registry.DECODER, registry.ATTENTION,
            registry.MATMUL, registry.DATASET, registry.TEMPLATE)

# Names of settings that are not kinds of a registry family.
STAGES = (*optim.STAGES, 'custom')
SCHEDULES = ('cosine', 'linear', 'constant')
OPTIMIZERS = ('adamw',)
INIT_KINDS = ('random', 'hf', 'hf_parts', 'checkpoint')

# Logical axis name -> the config dimensions that carry it, for the divisibility check
# against whatever mesh axes `config.mesh.rules` maps the name to.
_LOGICAL_DIMS = {
    'heads': ('model.decoder.heads', 'model.vision.heads'),
    'kv_heads': ('model.decoder.kv_heads',),
    'mlp': ('model.decoder.mlp_dim', 'model.vision.mlp_dim'),
    'vocab': ('model.decoder.vocab_size',),
    'embed': ('model.decoder.width', 'model.vision.width'),
}

# Subtrees whose keys are free-form (user dictionaries), skipped by the schema check, and
# fields that take an int or a list (checked by the model checks instead).
_FREE_FORM = ('optimizer.module_lr', 'model.decoder.rope_scaling', 'mesh.rules',
              'model.vision.feature_layer')


def _get(config, dotted: str):
  """The value at a dotted key, or None where the tree has no such key (not a default)."""
  node = config
  for part in dotted.split('.'):
    if node is None or not hasattr(node, 'get'):
      return None
    node = node.get(part, None)
  return node


def _choice(p: registry.Problems, config, key: str, allowed, extra: str = ''):
  value = _get(config, key)
  if value not in allowed:
    p.add(key, f'unknown value {value!r}', f'use one of {list(allowed)}{extra}')


def _check_schema(p: registry.Problems, config, base, prefix=''):
  """Keys absent from the base tree, and values whose type differs from the base's."""
  for key in config.keys():
    path = f'{prefix}{key}'
    if path in _FREE_FORM:
      continue
    if key not in base:
      close = [k for k in base.keys() if _similar(k, key)]
      hint = f'did you mean {prefix}{close[0]}?' if close else (
          f'remove it, or add it with a default to lvm/config.py; known keys under '
          f'{prefix or "config."}: {sorted(base.keys())}')
      p.add(path, 'unknown key', hint)
      continue
    value, ref = config[key], base[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if isinstance(value, ml_collections.ConfigDict):
        _check_schema(p, value, ref, path + '.')
      else:
        p.add(path, f'expected a config group, got {type(value).__name__}',
              f'set the fields under {path} one by one')
      continue
    if ref is None or value is None:
      continue
    if not _type_ok(value, ref):
      p.add(path, f'expected {type(ref).__name__}, got {type(value).__name__} {value!r}',
            f'pass a {type(ref).__name__} (e.g. {ref!r})')


def _type_ok(value, ref) -> bool:
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, str):
    return isinstance(value, str)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _similar(a: str, b: str) -> bool:
  """Close spellings: one edit apart, or the same letters in another order."""
  if sorted(a) == sorted(b):
    return True
  if abs(len(a) - len(b)) > 1:
    return False
  # One substitution / insertion / deletion.
  i = 0
  while i < min(len(a), len(b)) and a[i] == b[i]:
    i += 1
  return a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]


def _mesh_sizes(p: registry.Problems, config, num_devices: int) -> dict[str, int] | None:
  try:
    shape = sharding.mesh_shape(config.mesh, num_devices)
  except (ValueError, TypeError, KeyError) as e:
    sizes = {a: _get(config, f'mesh.{a}') for a in sharding.MESH_AXES}
    p.add('mesh', f'{sizes} does not fit {num_devices} device(s) ({e})',
          f'make mesh.data * mesh.fsdp * mesh.tensor equal {num_devices}, or set one axis to '
          f'-1 to infer it (e.g. --config.mesh.data=-1)')
    return None
  return dict(zip(sharding.MESH_AXES, shape))


def _check_mesh_divisibility(p: registry.Problems, config, mesh: dict[str, int]):
  """Every dimension named by a rule must split evenly over the rule's mesh axes."""
  try:
    axis_rules = sharding.rules(config)
  except (TypeError, ValueError) as e:
    p.add('mesh.rules', f'not a list of (logical name, mesh axes) pairs ({e})',
          'follow lvm/config.py DEFAULT_RULES')
    return
  for name, axes in axis_rules:
    if name not in _LOGICAL_DIMS or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in mesh]
    if unknown:
      p.add('mesh.rules', f'rule {name!r} names unknown mesh axes {unknown}',
            f'use axes from {list(sharding.MESH_AXES)}')
      continue
    split = math.prod(mesh[a] for a in axes)
    if split == 1:
      continue
    for key in _LOGICAL_DIMS[name]:
      dim = _get(config, key)
      if isinstance(dim, int) and dim % split:
        axes_str = '*'.join(f'mesh.{a}' for a in axes)
        p.add(key, f'{dim} is not divisible by {axes_str} = {split} (logical axis {name!r} is '
                   f'sharded over {axes})',
              f'choose {key} as a multiple of {split}, or make {axes_str} a divisor of {dim}')


def _check_kinds(p: registry.Problems, config) -> set[str]:
  """Each family's selected kind is registered, and that kind's own check passes.

  Returns:
    The config keys naming an unregistered kind (checks that need those kinds skip).
  """
  bad = set()
  for family in FAMILIES:
    name = _get(config, family.config_key)
    try:
      kind = family.get(name)
    except ValueError:
      p.add(family.config_key, f'{name!r} is not a registered {family.family}',
            f'use one of {list(family.names())}')
      bad.add(family.config_key)
      continue
    if kind.check is not None:
      kind.check(config, p)
  return bad


def _check_model_settings(p: registry.Problems, config):
  """The model settings that are not a kind of a family: dtypes and the remat policy."""
  for key in ('model.dtype', 'model.param_dtype'):
    _choice(p, config, key, tuple(models.DTYPES))
  _choice(p, config, 'model.remat_policy', tuple(_remat_policies()))


def _remat_policies():
  from lvm.models import layers  # pylint: disable=g-import-not-at-top
  return layers.REMAT_POLICIES


def _check_data(p: registry.Problems, config, bad_kinds: set[str]):
  """The data fields shared by every dataset (each dataset checks its own group)."""
  _choice(p, config, 'data.image_aspect', images.ASPECTS)
  _choice(p, config, 'data.anyres_tiles', ('bucket', 'max'))
  for key in ('data.image_mean', 'data.image_std'):
    value = _get(config, key)
    if not isinstance(value, (tuple, list)) or len(value) != 3:
      p.add(key, f'must be 3 numbers (R, G, B), got {value!r}', 'give one value per channel')
  std = _get(config, 'data.image_std')
  if isinstance(std, (tuple, list)) and any(not s > 0 for s in std):
    p.add('data.image_std', f'{std} has a non-positive entry', 'use positive stds')
  system = _get(config, 'data.system_prompt')
  if system is not None and not isinstance(system, str):
    p.add('data.system_prompt', f'must be text or None, got {system!r}',
          "None keeps the template's own, '' drops it")
  caption_prompt = _get(config, 'data.caption_prompt')
  if caption_prompt is not None and not isinstance(caption_prompt, str):
    p.add('data.caption_prompt', f'must be text, got {caption_prompt!r}', "'' turns it off")
  if isinstance(caption_prompt, str) and '<image>' in caption_prompt:
    p.add('data.caption_prompt', 'must not contain <image>',
          'the caption turn asks about the image already in the first turn')
  max_images = _get(config, 'data.max_images')
  if not isinstance(max_images, int) or max_images < 0:
    p.add('data.max_images', f'must be an integer >= 0, got {max_images!r}',
          'set it to the most images a sample may carry (LLaVA-1.5: 1)')
  packing.check_config(config, p)
  loaders.check_config(config, p)
  length_groups.check_config(config, p)
  feature_cache.check_config(config, p)
  mixture.check_config(config, p)
  seq_len = _get(config, 'data.seq_len')
  if not isinstance(seq_len, int) or seq_len < 2:
    p.add('data.seq_len', f'must be an integer >= 2, got {seq_len!r}', 'set a longer length')
    return
  if bad_kinds & {'model.vision.kind', 'model.projector.kind'}:
    return  # Reported with the kind; the token count is unknown.
  try:
    # A bad dtype name is reported on its own; it does not change the token count.
    model_config = copy.deepcopy(config.model)
    model_config.dtype = model_config.param_dtype = 'float32'
    per_image = models.max_image_tokens(model_config)  # anyres: the largest image's count
  except (ValueError, KeyError) as e:
    p.add('model.projector.kind', f'cannot count the visual tokens per image ({e})',
          "use model.vision.select='patch' or another projector")
    return
  if isinstance(max_images, int) and max_images > 0 and seq_len <= per_image:
    p.add('data.seq_len', f'{seq_len} leaves no room for text: one image alone takes '
          f'{per_image} tokens (image {_get(config, "model.vision.image_size")} px / patch '
          f'{_get(config, "model.vision.patch_size")}, projector '
          f'{_get(config, "model.projector.kind")!r})',
          f'set data.seq_len above {per_image} (at least {per_image + 32} to fit a question '
          f'and an answer), or use fewer visual tokens (larger patch, downsample_mlp)')


def _check_train(p: registry.Problems, config, mesh, num_processes: int):
  _choice(p, config, 'train.stage', STAGES)
  if _get(config, 'train.stage') == 'custom':
    pattern = _get(config, 'train.trainable')
    if not pattern:
      p.add('train.trainable', "is empty but train.stage is 'custom'",
            "give a regex over '/'-joined parameter paths, e.g. '^projector/'")
  pattern = _get(config, 'train.trainable')
  if pattern:
    try:
      re.compile(pattern)
    except re.error as e:
      p.add('train.trainable', f'{pattern!r} is not a valid regex ({e})', 'fix the regex')
  _choice(p, config, 'train.frozen_quantization', quantize.MODES)
  if _get(config, 'train.frozen_quantization') in ('int8', 'int4') and (
      _get(config, 'train.stage') == 'full'):
    p.add('train.frozen_quantization', "quantizes frozen weights but train.stage='full' "
          'freezes none', "set it to 'none', or pick a stage that freezes a module")

  batch = _get(config, 'train.batch_size')
  accum = _get(config, 'train.grad_accum_steps')
  if not isinstance(batch, int) or batch <= 0:
    p.add('train.batch_size', f'must be a positive integer, got {batch!r}',
          'set the global batch size')
    return
  if not isinstance(accum, int) or accum <= 0:
    p.add('train.grad_accum_steps', f'must be a positive integer, got {accum!r}', 'use 1 or more')
    return
  if batch % accum:
    p.add('train.batch_size', f'{batch} is not divisible by train.grad_accum_steps={accum}',
          f'use a multiple of {accum}')
    return
  micro = batch // accum
  if mesh is not None:
    shards = mesh['data'] * mesh['fsdp']
    if micro % shards:
      what = f'batch_size/grad_accum_steps = {micro}' if accum > 1 else f'{batch}'
      p.add('train.batch_size', f'{what} is not divisible by mesh.data*mesh.fsdp = {shards} '
            '(the batch is sharded over both)',
            f'use a batch size that is a multiple of {shards * accum}, or shrink '
            'mesh.data/mesh.fsdp (e.g. move devices to mesh.tensor)')
  if num_processes > 1 and batch % num_processes:
    p.add('train.batch_size', f'{batch} is not divisible by the {num_processes} processes '
          '(each loads an equal slice)', f'use a multiple of {num_processes}')

  scored = _get(config, 'train.max_scored_tokens')
  seq_len = _get(config, 'data.seq_len')
  if not isinstance(scored, int) or scored < 0:
    p.add('train.max_scored_tokens', f'must be an integer >= 0, got {scored!r}',
          'use 0 to score every position')
  elif isinstance(seq_len, int) and scored >= seq_len:
    p.add('train.max_scored_tokens', f'{scored} is not below data.seq_len={seq_len} (a row has '
          f'at most {seq_len - 1} targets)', 'use 0 to score every position')

  steps = _get(config, 'train.num_steps')
  epochs = _get(config, 'train.num_epochs')
  if not (isinstance(steps, int) and steps > 0) and not (
      isinstance(epochs, (int, float)) and epochs > 0):
    p.add('train.num_steps', f'{steps!r} and train.num_epochs={epochs!r} give no steps to run',
          'set train.num_steps > 0 or train.num_epochs > 0')
  for key in ('train.log_every',):
    value = _get(config, key)
    if not isinstance(value, int) or value <= 0:
      p.add(key, f'must be a positive integer, got {value!r}', 'use 1 or more')
  for key in ('train.eval_every',):
    value = _get(config, key)
    if not isinstance(value, int) or value < 0:
      p.add(key, f'must be an integer >= 0, got {value!r}', 'use 0 (only at the end) or more')
  _check_eval_benchmarks(p, config)


def _check_eval_benchmarks(p: registry.Problems, config):
  from lvm import eval as benchmarks  # pylint: disable=g-import-not-at-top
  specs = _get(config, 'train.eval_benchmarks')
  if isinstance(specs, str) or not isinstance(specs, (tuple, list)):
    p.add('train.eval_benchmarks', f'must be a tuple of NAME[:SPLIT][=DATA_DIR], got {specs!r}',
          "e.g. ('pope=/data/pope',); () for none")
    specs = ()
  for spec in specs:
    problem = benchmarks.spec_problem(spec)
    if problem:
      p.add('train.eval_benchmarks', problem, 'fix the entry or remove it')
  for key, low in (('train.eval_benchmark_questions', 0), ('train.eval_benchmark_batch_size', 1)):
    value = _get(config, key)
    if not isinstance(value, int) or value < low:
      p.add(key, f'must be an integer >= {low}, got {value!r}',
            'use 0 for every question' if low == 0 else 'use 1 or more')


def _check_optimizer(p: registry.Problems, config):
  _choice(p, config, 'optimizer.name', OPTIMIZERS)
  _choice(p, config, 'optimizer.schedule', SCHEDULES)
  lr = _get(config, 'optimizer.lr')
  if not isinstance(lr, (int, float)) or not lr > 0:
    p.add('optimizer.lr', f'must be positive, got {lr!r}', 'set a learning rate such as 2e-5')
  ratio = _get(config, 'optimizer.warmup_ratio')
  if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
    p.add('optimizer.warmup_ratio', f'must be in [0, 1], got {ratio!r}', 'LLaVA-1.5 uses 0.03')
  warmup = _get(config, 'optimizer.warmup_steps')
  if not isinstance(warmup, int) or warmup < 0:
    p.add('optimizer.warmup_steps', f'must be an integer >= 0, got {warmup!r}', 'use 0 or more')
  for key in ('optimizer.weight_decay', 'optimizer.clip_norm'):
    value = _get(config, key)
    if not isinstance(value, (int, float)) or value < 0:
      p.add(key, f'must be >= 0, got {value!r}', 'use 0 to turn it off')


def _check_checkpoint_and_init(p: registry.Problems, config):
  interval = _get(config, 'checkpoint.interval')
  if not isinstance(interval, int) or interval <= 0:
    p.add('checkpoint.interval', f'must be a positive integer, got {interval!r}',
          'save every N steps (N >= 1)')
  keep = _get(config, 'checkpoint.keep')
  if not isinstance(keep, int) or keep < 1:
    p.add('checkpoint.keep', f'must be >= 1, got {keep!r}',
          'keep at least 1 checkpoint (2+ lets a corrupt newest one fall back)')
  _choice(p, config, 'init.kind', INIT_KINDS)
  kind = _get(config, 'init.kind')
  needs = {'hf': ('init.path',), 'checkpoint': ('init.path',),
           'hf_parts': ('init.vision_path', 'init.decoder_path')}.get(kind, ())
  for key in needs:
    if not _get(config, key):
      p.add(key, f"is empty but init.kind is {kind!r}", 'give the folder to load from')


def _check_lora(p: registry.Problems, config):
  """`config.lora`'s own settings (its fit to the parameters: `validate_trainable`)."""
  lora = config.get('lora')
  if lora is None or not lora.enable:
    return
  try:
    re.compile(lora.targets)
  except re.error as e:
    p.add('lora.targets', f'{lora.targets!r} is not a valid regex ({e})', 'fix the regex')
  if lora.train_full:
    try:
      re.compile(lora.train_full)
    except re.error as e:
      p.add('lora.train_full', f'{lora.train_full!r} is not a valid regex ({e})',
            "fix the regex ('' trains only the adapters)")
  if not isinstance(lora.rank, int) or lora.rank < 1:
    p.add('lora.rank', f'must be a positive integer, got {lora.rank!r}', 'e.g. 8 or 128')
  if not lora.alpha > 0:
    p.add('lora.alpha', f'must be > 0, got {lora.alpha!r}', 'e.g. twice the rank')
  if not 0 <= lora.dropout < 1:
    p.add('lora.dropout', f'must be in [0, 1), got {lora.dropout!r}', 'e.g. 0.05')


def validate_config(config, num_devices: int, num_processes: int = 1) -> None:
  """Checks a full run config before anything is traced or compiled.

  Args:
    config: the run's ConfigDict (the lvm/config.py tree).
    num_devices: the global device count the mesh must fill.
    num_processes: JAX processes; the global batch is split evenly between them.

  Raises:
    ValueError: listing every problem, each naming its `config.` key and the fix.
  """
  p = registry.Problems()
  _check_schema(p, config, config_lib.get_config())
  # A broken tree makes the checks below misleading; report it alone.
  p.raise_if_any('config')
  mesh = _mesh_sizes(p, config, num_devices)
  if mesh is not None:
    _check_mesh_divisibility(p, config, mesh)
  bad_kinds = _check_kinds(p, config)
  _check_model_settings(p, config)
  _check_data(p, config, bad_kinds)
  _check_train(p, config, mesh, num_processes)
  _check_optimizer(p, config)
  _check_checkpoint_and_init(p, config)
  _check_lora(p, config)
  p.raise_if_any('config')


def param_paths(params) -> list[str]:
  """'/'-joined paths of every leaf of a (boxed or plain, abstract or real) param tree."""
  return list(optim.flatten(nn.unbox(params)))


def validate_trainable(config, abstract_params: Any) -> list[str]:
  """Checks that the stage (and LoRA, `lvm.lora.check`) trains something; returns the
  trainable paths.

  Args:
    config: the run config.
    abstract_params: the model's param tree (e.g. `jax.eval_shape(model.init, ...)['params']`),
      boxed or unboxed.

  Raises:
    ValueError: if the trainable pattern matches no parameter (naming the key, a sample of
      the paths it could match, and the fix).
  """
  pattern = lora.trainable_regex(config)
  paths = param_paths(abstract_params)
  if lora.spec(config) is not None:
    p = registry.Problems()
    shapes = {k: tuple(v.shape) for k, v in optim.flatten(nn.unbox(abstract_params)).items()}
    lora.check(config, shapes, p)
    p.raise_if_any('LoRA config')
  regex = re.compile(pattern)
  matched = [path for path in paths if regex.search(path)]
  if not matched:
    tops = sorted({path.split('/')[0] for path in paths})
    sample = ', '.join(paths[:3] + ['...'] + paths[-2:]) if len(paths) > 5 else ', '.join(paths)
    key = optim.trainable_key(config.train)
    raise ValueError(
        f'config.{key}: the trainable pattern {pattern!r} (stage {config.train.stage!r}) '
        f'matches none of the {len(paths)} parameters, so nothing would train. Parameter '
        f"paths are '/'-joined, e.g. {sample}; top-level modules: {tops}. Fix: use a regex "
        "that matches some of them (re.search), e.g. '^projector/' or '^decoder/layers'.")
  feature_cache.check_trainable(config, matched)
  return matched
