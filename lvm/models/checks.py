"""Helpers for the config checks the model kinds register (`lvm.registry.Check`)."""

from lvm import registry


def positive_ints(problems: registry.Problems, group, prefix: str, keys) -> None:
  """A problem for each of `group`'s `keys` that is not a positive integer."""
  for key in keys:
    value = group.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      problems.add(f'{prefix}.{key}', f'must be a positive integer, got {value!r}',
                   'set a positive integer')


def all_positive(group, keys) -> bool:
  """Whether every one of `keys` is a positive integer (so a check may divide by it)."""
  return all(isinstance(group.get(k), int) and group.get(k) > 0 for k in keys)
