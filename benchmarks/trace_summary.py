"""Device time per step by kernel, from the Perfetto trace that `lvm.bench --profile_dir` writes.

  python -m lvm.bench --config=... --mode=decode --steps=16 --profile_dir=/tmp/prof
  python -m benchmarks.trace_summary /tmp/prof --steps=16 [--top=25]

Sums the durations of the complete events on the accelerator's tracks (process names with
'/device:'), divides by the number of traced steps, and prints the busiest kernels: how the
docs/performance.md GPU profiles (weight copies, attention) were read. The events of the
profiled steps include the profiler's overhead; compare traced runs with traced runs.
"""

import collections
import glob
import gzip
import json
import os

from absl import app, flags

flags.DEFINE_integer('steps', 1, 'Steps the trace holds (the bench\'s --steps).')
flags.DEFINE_integer('top', 25, 'Kernels to list.')


def trace_file(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz under it."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {path}')
  return found[-1]


def summarize(path: str, steps: int) -> tuple[float, list[tuple[str, float, int]]]:
  """(device ms per step, [(kernel, ms per step, calls per step)] busiest first)."""
  with gzip.open(trace_file(path)) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  device_pids = {e['pid'] for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and '/device:' in e['args'].get('name', '')}
  if not device_pids:
    raise ValueError('the trace has no device track (a CPU-only run?)')
  total_us, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device_pids:
      total_us[e['name']] += e['dur']
      calls[e['name']] += 1
  per_step = sum(total_us.values()) / 1e3 / steps
  rows = [(name, us / 1e3 / steps, calls[name] // steps) for name, us in total_us.most_common()]
  return per_step, rows


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m benchmarks.trace_summary TRACE_DIR_OR_FILE --steps=N')
  f = flags.FLAGS
  per_step, rows = summarize(argv[1], f.steps)
  print(f'device busy {per_step:.2f} ms/step (sum of kernel times over {f.steps} steps)')
  for name, ms, n in rows[:f.top]:
    print(f'{ms:9.3f} ms/step {n:6d} calls/step  {name[:100]}')


if __name__ == '__main__':
  app.run(main)
