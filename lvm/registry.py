"""Registries of the kinds a config names, each kind registered where it is implemented.

A family (vision towers, projectors, decoder families, attention and matmul kernels,
datasets, templates, benchmarks) is one `Registry`. The module that implements a kind
registers its name with the object that builds or runs it, the config defaults it
brings, and a check of its own config fields:

    @registry.DECODER.register('llama', defaults=llama_defaults, check=check_llama)
    def build_llama(model_config, dtypes): ...

`lvm.validate` runs the checks of the kinds a config selects, `lvm.config` takes the
defaults, and `lvm.models.build` / the data pipeline look kinds up here, so a new kind
touches its own module and its tests, never a parallel list of names elsewhere.

A registry imports its family's package on first lookup (`lvm.models`, `lvm.data`, ...),
whose `__init__` imports the implementing modules: asking for the names never depends on
what the caller happened to import before.
"""

import dataclasses
import importlib
import re
from typing import Any, Callable


class Problems:
  """Collects `config.KEY: problem. Fix: fix.` lines and raises them as one error."""

  def __init__(self):
    self.lines: list[str] = []

  def add(self, key: str, problem: str, fix: str):
    self.lines.append(f'config.{key}: {problem}. Fix: {fix}.')

  def raise_if_any(self, what: str):
    if self.lines:
      raise ValueError(f'Invalid {what} ({len(self.lines)} problem(s)):\n  - '
                       + '\n  - '.join(self.lines))


# check(config, problems): adds a line to `problems` for each fault of the kind's own
# fields in the full run config; it runs only when the config selects the kind.
Check = Callable[[Any, Problems], None]


@dataclasses.dataclass(frozen=True)
class Kind:
  """One registered kind.

  Attributes:
    name: the value the config gives (e.g. `model.decoder.kind='llama'`).
    obj: what implements it (a builder function, a module class, a dataset module...).
    defaults: None, or a function returning the config fields this kind brings (a
      ConfigDict or dict); the family decides where they go (see `lvm.config`).
    check: None, or the kind's own config check (see `Check`).
    pattern: None, or a regex that config values of this kind fully match, for
      parametrised names (`mlp{k}x_gelu` is registered once as `mlp(\\d+)x_gelu`).
  """
  name: str
  obj: Any
  defaults: Callable[[], Any] | None = None
  check: Check | None = None
  pattern: str | None = None


class Registry:
  """Name -> `Kind` for one family of kinds."""

  def __init__(self, family: str, config_key: str, package: str):
    """
    Args:
      family: what the kinds are, for messages ('decoder family').
      config_key: the dotted config key naming a kind ('model.decoder.kind').
      package: imported before any lookup; it imports the modules that register.
    """
    self.family, self.config_key, self.package = family, config_key, package
    self._kinds: dict[str, Kind] = {}

  def register(self, name: str, obj: Any = None, *, defaults=None, check: Check | None = None,
               pattern: str | None = None):
    """Registers `obj` under `name`; without `obj`, returns a decorator that does.

    Registering the same name twice with another object is an error (two modules
    claiming one config value); the same object again is a no-op (module reloads).
    """
    if obj is None:
      def decorate(target):
        self.register(name, target, defaults=defaults, check=check, pattern=pattern)
        return target
      return decorate
    old = self._kinds.get(name)
    if old is not None and old.obj is not obj and _qualname(old.obj) != _qualname(obj):
      raise ValueError(f'{self.family} {name!r} is registered twice: by {_qualname(old.obj)} '
                       f'and by {_qualname(obj)}')
    self._kinds[name] = Kind(name, obj, defaults, check, pattern)
    return obj

  def unregister(self, name: str):
    """Removes a kind (tests that register a kind of their own clean up with this)."""
    self._kinds.pop(name, None)

  def _load(self):
    importlib.import_module(self.package)

  def names(self) -> tuple[str, ...]:
    self._load()
    return tuple(sorted(self._kinds))

  def __contains__(self, name) -> bool:
    try:
      self.get(name)
    except ValueError:
      return False
    return True

  def get(self, name: str) -> Kind:
    """The kind registered as `name`; a ValueError naming the config key if none is."""
    self._load()
    if name in self._kinds:
      return self._kinds[name]
    for kind in self._kinds.values():
      if kind.pattern and isinstance(name, str) and re.fullmatch(kind.pattern, name):
        return kind
    raise ValueError(f'config.{self.config_key}={name!r} is not a registered {self.family}; '
                     f'registered: {sorted(self._kinds)}')

  def kinds(self) -> tuple[Kind, ...]:
    self._load()
    return tuple(self._kinds[n] for n in sorted(self._kinds))


def _qualname(obj) -> str:
  return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", repr(obj))}'


VISION = Registry('vision tower', 'model.vision.kind', 'lvm.models')
PROJECTOR = Registry('projector', 'model.projector.kind', 'lvm.models')
DECODER = Registry('decoder family', 'model.decoder.kind', 'lvm.models')
ATTENTION = Registry('attention kernel', 'model.attention_impl', 'lvm.kernels')
MATMUL = Registry('matmul kernel', 'model.matmul_impl', 'lvm.kernels')
DATASET = Registry('dataset', 'data.dataset', 'lvm.data')
TEMPLATE = Registry('template', 'data.template', 'lvm.data')
BENCHMARK = Registry('benchmark', 'benchmark', 'lvm.eval')
