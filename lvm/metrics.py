"""Run outputs: `config.json`, `metrics.jsonl`, TensorBoard events, and lvm's console lines.

One JSON object a line: `step`, `split` ('train', 'eval' for the validation split,
'test' for the held-out test split), `time` (seconds since the run started) and the
metric values. Only process 0 writes.
"""

import json
import math
import time
from typing import Any

from etils import epath
import jax

from lvm import console

# Object stores: seconds between rewrites of the whole metrics.jsonl (see MetricWriter).
REMOTE_FLUSH_SECONDS = 30.0


def _plain(value):
  """JSON-safe scalars (NaN/Inf become strings JSON can hold)."""
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Writes config.json, metrics.jsonl and TensorBoard summaries; prints lvm's lines.

  Paths go through `etils.epath`, so a workdir may be anywhere orbax can write. Object
  stores (`gs://`, `s3://`) cannot append to a file: there metrics.jsonl is kept in memory
  and written whole every `REMOTE_FLUSH_SECONDS`, at each checkpoint (`flush`) and at
  `close`, so a hard kill loses at most the records since the last of those (the steps
  after the last checkpoint are trained and logged again on resume anyway).

  Args:
    workdir: the run's folder (a str or an `epath.Path`).
    start_time: `time.time()` when the run started (resumed runs keep counting from
      the restart).
  """

  def __init__(self, workdir, start_time: float | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = epath.Path(workdir)
    self.start_time = time.time() if start_time is None else start_time
    self._tb = None
    self._jsonl = None
    self._path = self.workdir / 'metrics.jsonl'
    self._lines = None  # object stores: every line of the file, written whole on flush
    self._flushed_at = time.time()
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path = self._path
      torn = path.exists() and not _ends_with_newline(path)
      if appends(path):
        self._jsonl = path.open('a')
        # A run killed mid-write leaves a torn last line: end it so the next record
        # starts on a line of its own (readers skip the torn one).
        if torn:
          self._jsonl.write('\n')
      else:
        self._lines = [line + '\n' for line in path.read_text().splitlines()
                       ] if path.exists() else []
      try:
        from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
        self._tb = tensorboard.SummaryWriter(str(self.workdir / 'tensorboard'))
      except ImportError:  # TensorFlow missing: jsonl only.
        self._tb = None

  def write_config(self, config) -> None:
    """Writes `workdir/config.json`, the resolved config."""
    if self.enabled:
      (self.workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict:
    """Appends one line and the TensorBoard scalars; returns the written record."""
    record = {'step': int(step), 'split': split,
              'time': round(time.time() - self.start_time, 3)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    if self._lines is None:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
    else:
      self._lines.append(json.dumps(record) + '\n')
      if time.time() - self._flushed_at >= REMOTE_FLUSH_SECONDS:
        self.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('step', 'split') and isinstance(value, (int, float)):
          self._tb.scalar(f'{split}/{key}', value, step)
      self._tb.flush()
    return record

  def log(self, message: str) -> None:
    """A line on stdout (process 0), above any progress bar."""
    if self.enabled:
      console.line(message)

  def flush(self) -> None:
    """Writes buffered metrics out (object stores: the whole file, replaced at once)."""
    if not self.enabled:
      return
    if self._lines is not None:
      self._path.write_text(''.join(self._lines))
    self._flushed_at = time.time()

  def close(self) -> None:
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def appends(path: epath.Path) -> bool:
  """Whether `path` is on a file system that appends in place: a local disk does, an
  object store (`gs://`, `s3://`, any `scheme://` but `file://`) does not."""
  text = str(path)
  return '://' not in text or text.startswith('file://')


def _ends_with_newline(path: epath.Path) -> bool:
  with path.open('rb') as f:
    f.seek(0, 2)
    if not f.tell():
      return True
    f.seek(-1, 2)
    return f.read(1) == b'\n'


def read_jsonl(path) -> list[dict]:
  """All records of a metrics.jsonl file (a workdir or the file itself).

  A line torn by a killed run (not valid JSON) is skipped; the resumed run logs that
  step again.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / 'metrics.jsonl'
  records = []
  with path.open() as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
