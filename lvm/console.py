"""The console: lvm's own lines, progress bars on terminals, other libraries' logs on demand.

A run shows what lvm says (its printed lines and its own log records) and, from other
libraries' Python logs, WARNING and above: orbax alone logs about 70 INFO lines a training
run through absl. (TensorFlow's C++ runtime still prints its two oneDNN lines when the
data pipeline first imports it: no Python setting reaches them.) Give absl's `--verbosity`
flag explicitly (`--verbosity=0`: INFO, `--verbosity=1`: DEBUG; also `-v 0`) to see every
library's log at that level. `quiet_libraries()` applies this for the span of a `with`
block (set up by `train_and_evaluate`, never at import).

Progress bars (tqdm: count, rate, ETA) are drawn only when stdout is a terminal; in logs
and CI the plain lines stand alone.
"""

import contextlib
import logging
import os
import sys

import tqdm

_LVM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def interactive() -> bool:
  """Whether progress bars are drawn: stdout is a terminal (only process 0 draws them)."""
  import jax  # pylint: disable=import-outside-toplevel
  return sys.stdout.isatty() and jax.process_index() == 0


def library_logs_requested() -> bool:
  """Whether the command line set absl's `--verbosity` (then every library logs at it)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  return f.is_parsed() and 'verbosity' in f and f['verbosity'].present > 0


class _OwnOrWarning(logging.Filter):
  """Passes lvm's own records and other modules' WARNING and above."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or record.pathname.startswith(_LVM_DIR)


@contextlib.contextmanager
def quiet_libraries(verbose: bool | None = None):
  """Within the block, other libraries log WARNING and above only (see the module doc).

  Args:
    verbose: True keeps every log; None: as `library_logs_requested()`.
  """
  if verbose is None:
    verbose = library_logs_requested()
  if verbose:
    yield
    return
  own = _OwnOrWarning()
  handlers = list(logging.getLogger().handlers)  # absl's handler under app.run
  for h in handlers:
    h.addFilter(own)
  try:
    yield
  finally:
    for h in handlers:
      h.removeFilter(own)


@contextlib.contextmanager
def tfds_progress(enabled: bool):
  """TFDS's dataset-preparation bars on (a terminal) or off (logs) within the block."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
  before = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(enabled)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(before)


def progress(iterable, *, total: int | None = None, desc: str = '', unit: str = 'it'):
  """`iterable`, behind a progress bar (count, rate, ETA) when stdout is a terminal."""
  if not interactive():
    return iterable
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                   file=sys.stdout, dynamic_ncols=True)


def bar(total: int, initial: int = 0, desc: str = '', unit: str = 'it'):
  """A tqdm bar to update by hand, or None when stdout is not a terminal."""
  if not interactive():
    return None
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stdout,
                   dynamic_ncols=True)


def line(message: str) -> None:
  """Prints a line to stdout; on a terminal, above the progress bars (which stay drawn)."""
  if sys.stdout.isatty():
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
  else:
    print(message, flush=True)
