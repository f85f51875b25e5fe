"""Run outputs: `metrics.jsonl`, TensorBoard events, and a terminal progress line.

One JSON object a line: `step`, `split` ('train', 'eval' for the validation split,
'test' for the held-out test split), `time` (seconds since the run started) and the
metric values. Only process 0 writes.
"""

import json
import math
import os
import sys
import time
from typing import Any

import jax


def _plain(value):
  """JSON-safe scalars (NaN/Inf become strings JSON can hold)."""
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Writes metrics.jsonl and TensorBoard summaries; prints progress.

  Args:
    workdir: the run's folder.
    total_steps: for the progress bar's ETA.
    start_time: `time.time()` when the run started (resumed runs keep counting from
      the restart).
  """

  def __init__(self, workdir: str, total_steps: int, start_time: float | None = None):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.start_time = time.time() if start_time is None else start_time
    self.interactive = sys.stderr.isatty()
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      self._jsonl = open(path, 'a')
      # A run killed mid-write leaves a torn last line: end it so the next record
      # starts on a line of its own (readers skip the torn one).
      if os.path.getsize(path) and not _ends_with_newline(path):
        self._jsonl.write('\n')
      try:
        from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
        self._tb = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorFlow missing: jsonl only.
        self._tb = None
    self._bar_start = None

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict:
    """Appends one line and the TensorBoard scalars; returns the written record."""
    record = {'step': int(step), 'split': split,
              'time': round(time.time() - self.start_time, 3)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('step', 'split') and isinstance(value, (int, float)):
          self._tb.scalar(f'{split}/{key}', value, step)
      self._tb.flush()
    return record

  def progress(self, step: int, first_step: int, loss: float) -> None:
    """A one-line progress bar with loss and ETA (interactive terminals only)."""
    if not (self.enabled and self.interactive):
      return
    now = time.time()
    if self._bar_start is None or step <= first_step:
      self._bar_start = (now, first_step)
    t0, s0 = self._bar_start
    done = step - s0
    eta = (now - t0) / done * (self.total_steps - step) if done > 0 else float('nan')
    width = 30
    filled = int(width * step / max(self.total_steps, 1))
    eta_s = '?' if not math.isfinite(eta) else f'{int(eta) // 60}:{int(eta) % 60:02d}'
    sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] {step}/{self.total_steps} '
                     f'loss {loss:.4f} ETA {eta_s}  ')
    sys.stderr.flush()
    if step >= self.total_steps:
      sys.stderr.write('\n')

  def log(self, message: str) -> None:
    """A line on stdout (process 0), starting on a fresh line after the bar."""
    if self.enabled:
      if self.interactive:
        sys.stderr.write('\n')
      print(message, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl file (a workdir or the file itself).

  A line torn by a killed run (not valid JSON) is skipped; the resumed run logs that
  step again.
  """
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
