"""Reading run folders: metrics, resolved config and whether a run is done, failed or going.

A run folder is what `lvm.main --workdir=DIR` writes (`config.json`, `metrics.jsonl`,
`checkpoints/`) plus `launch.json`, which the local launcher keeps beside it: the command,
pid, host, start/end time and exit code of the last launch. Status, most certain first:

  done     metrics.jsonl has a 'test' line (lvm.main scores the test split once, at the
           end) or an eval line at the configured `train.num_steps`; or a `DONE` file; or
           (epoch-based runs, whose step count is not in config.json) exit code 0
  failed   the last launch exited non-zero (its log is `log.txt`)
  running  the launching process is alive on this host, or (no local launch record, e.g. a
           TPU/SLURM run) metrics.jsonl changed within the last `STALE_SECONDS`
  stopped  started but neither finished nor alive (killed, preempted: lvm.main exits 0
           after a SIGTERM checkpoint, machine rebooted); rerunning resumes it
  pending  nothing there yet

Paths may be local or `gs://...` (read through tf.io.gfile, imported only then).
"""

import dataclasses
import json
import math
import os
import socket
import time
from typing import Any

STALE_SECONDS = 600
LAUNCH_FILE = 'launch.json'
LOG_FILE = 'log.txt'
DONE_FILE = 'DONE'
SWEEP_FILE = 'sweep.json'


def _is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def exists(path: str) -> bool:
  return _gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def read_text(path: str) -> str:
  if _is_remote(path):
    with _gfile().GFile(path, 'r') as f:
      return f.read()
  with open(path, encoding='utf-8') as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  if _is_remote(path):
    with _gfile().GFile(path, 'w') as f:
      f.write(text)
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)  # atomic: a reader never sees half a file


def listdir(path: str) -> list[str]:
  if _is_remote(path):
    return sorted(p.rstrip('/') for p in _gfile().listdir(path))
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if _is_remote(path) else os.path.isdir(path)


def join(*parts: str) -> str:
  if _is_remote(parts[0]):
    return '/'.join([parts[0].rstrip('/')] + [p.strip('/') for p in parts[1:]])
  return os.path.join(*parts)


def read_json(path: str, default=None):
  if not exists(path):
    return default
  try:
    return json.loads(read_text(path))
  except (json.JSONDecodeError, OSError):
    return default


def read_metrics(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl as a list of dicts; a torn last line (run still writing) is skipped."""
  if not exists(path):
    return []
  rows = []
  for line in read_text(path).splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
  return rows


@dataclasses.dataclass
class Run:
  """One (variant, seed) folder as read from disk."""
  variant: str
  seed: str
  path: str
  status: str
  config: dict[str, Any]
  metrics: list[dict[str, Any]]
  launch: dict[str, Any]

  def split(self, split: str) -> list[dict[str, Any]]:
    return [m for m in self.metrics if m.get('split') == split]

  @property
  def num_steps(self) -> int:
    """Configured steps (`train.num_steps`), or -1 when the run is epoch-based or unknown."""
    return _num_steps(self.config)

  @property
  def last_step(self) -> int:
    return max((int(m['step']) for m in self.metrics), default=0)

  @property
  def wall_time(self) -> float:
    """Seconds of training: the largest `time` in metrics.jsonl (else from launch.json)."""
    t = [float(m['time']) for m in self.metrics if _finite(m.get('time'))]
    if t:
      # `time` restarts from 0 when a run resumes: add up the segments.
      total, prev = 0.0, 0.0
      for x in t:
        if x < prev:
          total += prev
        prev = x
      return total + prev
    if self.launch.get('end_time') and self.launch.get('start_time'):
      return float(self.launch['end_time']) - float(self.launch['start_time'])
    return math.nan


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pid_alive(pid: int) -> bool:
  if pid <= 0:  # os.kill(0 or -1, ...) would address process groups, not one process
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def status(path: str, config: dict[str, Any] | None = None,
           metrics: list[dict[str, Any]] | None = None,
           launch: dict[str, Any] | None = None, now: float | None = None) -> str:
  """The status of the run folder `path` (see the module docstring)."""
  if not isdir(path):
    return 'pending'
  launch = read_json(join(path, LAUNCH_FILE), {}) if launch is None else launch
  config = read_json(join(path, 'config.json'), {}) if config is None else config
  metrics = read_metrics(join(path, 'metrics.jsonl')) if metrics is None else metrics
  now = time.time() if now is None else now
  if exists(join(path, DONE_FILE)) or metrics_complete(config, metrics):
    return 'done'
  rc = launch.get('returncode')
  if launch and rc is None:
    # Launched from here and not yet recorded as finished: alive or dead?
    if launch.get('host') == socket.gethostname() and _pid_alive(int(launch.get('pid', -1))):
      return 'running'
  if rc == 0:
    # lvm.main also exits 0 after a SIGTERM (preemption) checkpoint, so a clean exit only
    # counts as finished when the step count cannot be checked.
    return 'done' if _num_steps(config) <= 0 and metrics else 'stopped'
  if rc is not None:
    return 'failed'
  if launch:
    return 'stopped'
  mfile = join(path, 'metrics.jsonl')
  if not _is_remote(path) and exists(mfile):
    return 'running' if now - os.path.getmtime(mfile) < STALE_SECONDS else 'stopped'
  if metrics or config:
    return 'running' if _is_remote(path) else 'stopped'
  return 'pending'


def _num_steps(config: dict[str, Any]) -> int:
  try:
    return int((config.get('train') or {}).get('num_steps', -1))
  except (TypeError, ValueError):
    return -1


def metrics_complete(config: dict[str, Any], metrics: list[dict[str, Any]]) -> bool:
  """lvm.main got to the end: a 'test' line (scored once, at the end) or an eval line at
  the configured `train.num_steps`."""
  if any(m.get('split') == 'test' for m in metrics):
    return True
  num_steps = _num_steps(config)
  evals = [int(m['step']) for m in metrics if m.get('split') == 'eval']
  return num_steps > 0 and bool(evals) and max(evals) >= num_steps


def read_run(root: str, variant: str, seed: str) -> Run:
  path = join(root, variant, str(seed))
  config = read_json(join(path, 'config.json'), {}) or {}
  metrics = read_metrics(join(path, 'metrics.jsonl'))
  launch = read_json(join(path, LAUNCH_FILE), {}) or {}
  return Run(variant=variant, seed=str(seed), path=path,
             status=status(path, config, metrics, launch), config=config,
             metrics=metrics, launch=launch)


def discover(root: str) -> tuple[dict[str, Any] | None, list[Run]]:
  """All runs under `root`: those the sweep.json names (even if not started) and any
  `<variant>/<seed>/` folder holding a config.json or metrics.jsonl.

  Returns:
    (the sweep.json written by experiments.run or None, runs in sweep order then by name).
  """
  if not isdir(root):
    raise FileNotFoundError(f'no sweep folder {root}')
  sweep = read_json(join(root, SWEEP_FILE))
  pairs = []
  if sweep:
    for v in sweep.get('variants', []):
      for s in v.get('seeds', []):
        pairs.append((v['name'], str(s)))
  for variant in listdir(root):
    vdir = join(root, variant)
    if not isdir(vdir):
      continue
    for seed in listdir(vdir):
      sdir = join(vdir, seed)
      if (variant, seed) in pairs or not isdir(sdir):
        continue
      if exists(join(sdir, 'config.json')) or exists(join(sdir, 'metrics.jsonl')) or exists(
          join(sdir, LAUNCH_FILE)):
        pairs.append((variant, seed))
  return sweep, [read_run(root, v, s) for v, s in pairs]
