"""The one command-line pattern of lvm's `python -m` entry points: absl flags + config_flags.

Every entry point defines its flags with absl (configs with `config_flags`) and starts with
`cli.run(main)`. Flag parsing errors, a mistyped `--config.` key and a config file that does
not load end in ONE line naming the flag, key or file (with a suggestion for a key) and exit
status 2, instead of the config library's traceback.
"""

import difflib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

USAGE_ERROR = 2


def schema():
  """The full config schema (every key with its default), for suggestions."""
  from lvm import config  # pylint: disable=g-import-not-at-top
  return config.get_config()


def _keys(config, prefix='') -> list[str]:
  out = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    out.append(path)
    if hasattr(value, 'items'):
      out.extend(_keys(value, path + '.'))
  return out


def _suggest(key: str, keys: list[str]) -> str | None:
  """The schema key closest to a mistyped `key`: a sibling (same group) first."""
  parent, _, leaf = key.rpartition('.')
  if parent in keys:
    siblings = {k.rpartition('.')[2]: k for k in keys if k.rpartition('.')[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
    if close:
      return siblings[close[0]]
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  return close[0] if close else None


def _config_flag_names(flag_values) -> list[str]:
  return [name for name in flag_values
          if config_flags.config_flags.is_config_flag(flag_values[name])]


def unknown_config_key(argv, flag_values=flags.FLAGS) -> str | None:
  """One line for the first `--NAME.key=...` override whose key the schema lacks, or None."""
  names = _config_flag_names(flag_values)
  keys = None
  for arg in argv[1:]:
    if not arg.startswith('--') or '.' not in arg.split('=', 1)[0]:
      continue
    name, key = arg[2:].split('=', 1)[0].split('.', 1)
    if name not in names:
      continue
    if keys is None:
      try:
        keys = _keys(schema())
      except Exception:  # pylint: disable=broad-except
        return None
    if key not in keys:
      hint = _suggest(key, keys)
      hint = f' Did you mean --{name}.{hint}?' if hint else ''
      return f'Unknown config key --{name}.{key} (not in the config schema).{hint}'
  return None


def _load_configs(flag_values) -> str | None:
  """Loads every config flag now; one line naming the file if one fails, else None."""
  for name in _config_flag_names(flag_values):
    flag = flag_values[name]
    if flag.value is None:
      continue
    try:
      flag.value.keys()  # a file that failed to load is an object that raises on any use
    except Exception as e:  # pylint: disable=broad-except
      cause = e.__cause__ or e
      lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
      detail = lines[-1] if lines else type(cause).__name__
      return f'--{name}={flag.config_filename}: cannot load the config file: {detail}'
  return None


def _summary(error: BaseException) -> str:
  """One line: the error's first line and, when it wraps another (a config file's own
  ValueError inside absl's flag error), the root error's first line."""
  def first_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
  root = error
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  head = first_line(error)
  if root is error or first_line(root) in head:
    return head
  return f'{head} {type(root).__name__}: {first_line(root)}'


def parse_flags(argv, flag_values=flags.FLAGS):
  """Parses `argv`; exits with status 2 and one line on a bad flag, config key or file."""
  try:
    rest = flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = unknown_config_key(argv, flag_values) or _summary(e)
    print(f'Error: {message}', file=sys.stderr)
    sys.exit(USAGE_ERROR)
  message = _load_configs(flag_values)
  if message:
    print(f'Error: {message}', file=sys.stderr)
    sys.exit(USAGE_ERROR)
  return rest


def run(main):
  """`app.run(main)` with `parse_flags`."""
  app.run(main, flags_parser=parse_flags)


def fail(message: str):
  """Ends the program with one line and the usage-error status."""
  print(f'Error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)
