"""The sweep data model: one base config, named variants of overrides, seeds.

An experiment file in `experiments/` defines `get_sweep() -> Sweep`:

  def get_sweep():
    return sweep.Sweep(
        name='shapes_projector',
        config='configs/shapes.py',
        overrides={'train.num_steps': 200},      # shared by every variant
        variants=[sweep.Variant('linear', {'model.projector.kind': 'linear'}),
                  sweep.Variant('mlp2x_gelu', {})],
        seeds=(0, 1))

Each (variant, seed) is one run of `python -m lvm.main` in `ROOT/<variant>/<seed>/` with the
shared and the variant's overrides passed as `--config.KEY=VALUE` flags, the seed as
`--config.train.seed`. Overrides are checked against the base config (keys must exist, types
must match) before anything runs, so a typo fails at once instead of after an hour.
"""

import dataclasses
import importlib.util
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import ml_collections

# Experiment files and configs are named relative to the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME = re.compile(r'^[A-Za-z0-9_.=+-]+$')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of an ablation: a name (its folder) and the config overrides that define it.

  Attributes:
    name: folder-safe name, unique within the sweep.
    overrides: dotted config key -> value, e.g. {'model.projector.kind': 'linear'}.
    seeds: seeds for this variant; None uses the sweep's seeds.
  """
  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seeds: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A base config and its variants; see the module docstring.

  Attributes:
    name: the experiment's name (for reports).
    config: `PATH[:ARGS]` of the base config, PATH relative to the repository root.
    variants: the arms, run in this order.
    seeds: seeds each variant runs with (`train.seed`).
    overrides: applied to every variant before its own (e.g. a reduced step count).
    seed_key: the config key (or keys) that receive the seed, e.g.
      ('train.seed', 'data.shuffle_seed') to vary the data order too.
    description: one line for the report.
  """
  name: str
  config: str
  variants: Sequence[Variant]
  seeds: Sequence[int] = (0,)
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed_key: str | Sequence[str] = 'train.seed'
  description: str = ''

  def __post_init__(self):
    if not self.variants:
      raise ValueError(f'sweep {self.name!r} has no variants')
    names = [v.name for v in self.variants]
    for n in names:
      if not _NAME.match(n) or n in ('.', '..'):
        raise ValueError(f'variant name {n!r} must be folder-safe ([A-Za-z0-9_.=+-])')
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f'duplicate variant names {dupes} in sweep {self.name!r}')
    for v in self.variants:
      if not list(self.seeds_of(v)):
        raise ValueError(f'variant {v.name!r} has no seeds')

  @property
  def seed_keys(self) -> tuple[str, ...]:
    return (self.seed_key,) if isinstance(self.seed_key, str) else tuple(self.seed_key)

  def seeds_of(self, variant: Variant) -> tuple[int, ...]:
    return tuple(int(s) for s in (self.seeds if variant.seeds is None else variant.seeds))

  def runs(self, only: Sequence[str] | None = None) -> list[tuple[Variant, int]]:
    """(variant, seed) pairs in launch order, restricted to the variant names in `only`."""
    if only:
      unknown = sorted(set(only) - {v.name for v in self.variants})
      if unknown:
        raise ValueError(f'--only names unknown variants {unknown}; '
                         f'known: {[v.name for v in self.variants]}')
    return [(v, s) for v in self.variants if not only or v.name in only
            for s in self.seeds_of(v)]

  def overrides_of(self, variant: Variant, seed: int) -> dict[str, Any]:
    """All overrides of one run, in order: shared, the variant's, then the seed."""
    out = dict(self.overrides)
    out.update(variant.overrides)
    for key in self.seed_keys:
      out[key] = int(seed)
    return out

  def to_json(self) -> dict[str, Any]:
    return {
        'name': self.name, 'config': self.config, 'description': self.description,
        'seeds': list(self.seeds), 'seed_keys': list(self.seed_keys),
        'overrides': {k: jsonable(v) for k, v in self.overrides.items()},
        'variants': [{'name': v.name, 'overrides': {k: jsonable(x) for k, x in
                                                    v.overrides.items()},
                      'seeds': list(self.seeds_of(v))} for v in self.variants]}


def load_sweep(experiment: str) -> Sweep:
  """An experiment by module name (`shapes_projector`, `experiments.shapes_projector`) or path."""
  path = experiment
  if not path.endswith('.py'):
    name = experiment.removeprefix('experiments.')
    path = os.path.join(REPO_ROOT, 'experiments', name + '.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no experiment file {path} (looked for {experiment!r})')
  module = _import_file(path)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} defines no get_sweep()')
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise TypeError(f'{path}: get_sweep() must return an experiments.sweep.Sweep')
  return sweep


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`PATH[:ARGS]` -> `get_config(ARGS)`, as `lvm.main --config=PATH:ARGS` would build it."""
  path, _, arg = spec.partition(':')
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  if not os.path.exists(full):
    raise FileNotFoundError(f'no config file {full}')
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # config files import `lvm.config` (and `configs.*`)
  module = _import_file(full)
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides applied; unknown keys raise KeyError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f'override {key!r}: no config key {".".join(parents[:i + 1])!r}')
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(f'override {key!r}: the base config has no such key')
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f'override {key!r}={value!r}: {e}') from None
  return config


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict,
            prefix: str = '') -> dict[str, Any]:
  """Nested dicts -> {'a.b.c': leaf}; leaves are JSON-style (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  out = {}
  for k, v in config.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + '.'))
    else:
      out[key] = jsonable(v)
  return out


def diff(base: Mapping[str, Any], other: Mapping[str, Any],
         ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Flat keys whose values differ: key -> (base value, other value); missing is None."""
  a, b = flatten(base), flatten(other)
  out = {}
  for k in sorted(set(a) | set(b)):
    if k in ignore:
      continue
    if a.get(k) != b.get(k):
      out[k] = (a.get(k), b.get(k))
  return out


def format_value(value: Any) -> str:
  """A config value as `lvm.main --config.KEY=VALUE` (ml_collections config_flags) parses it."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if isinstance(value, float):
    return repr(value)
  return str(value)


def config_flags(overrides: Mapping[str, Any]) -> list[str]:
  return [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]


def jsonable(v):
  """A config value as JSON data (tuples become lists, ConfigDicts dicts)."""
  if isinstance(v, ml_collections.ConfigDict):
    v = v.to_dict()
  if isinstance(v, tuple):
    return [jsonable(x) for x in v]
  if isinstance(v, list):
    return [jsonable(x) for x in v]
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  return json.loads(json.dumps(v, default=str))


def _import_file(path: str):
  name = '_lvm_file_' + re.sub(r'\W', '_', os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
