"""Device time per step by kernel, from the Perfetto trace that `lvm.bench --profile_dir` writes.

  python -m lvm.bench --config=... --mode=decode --steps=16 --profile_dir=/tmp/prof
  python -m benchmarks.trace_summary /tmp/prof --steps=16 [--top=25]
  python -m benchmarks.trace_summary /tmp/prof --steps=16 --hlo=DUMP/...after_optimizations.txt

Sums the durations of the complete events on the accelerator's tracks (process names with
'/device:'), divides by the number of traced steps, and prints the busiest kernels: how the
docs/performance.md GPU profiles (weight copies, attention) were read. The events of the
profiled steps include the profiler's overhead; compare traced runs with traced runs.

With `--hlo` (the optimized HLO text of the profiled program, from
`XLA_FLAGS=--xla_dump_to=DIR`), each kernel is also charged to the JAX operation it came from:
the `op_name` metadata of the HLO instruction named in the event's `hlo_op`, with numbering and
the outer `jit(...)` dropped, so that e.g. every layer's SwiGLU backward adds up in one row.
"""

import collections
import glob
import gzip
import json
import os
import re

from absl import app, flags

flags.DEFINE_integer('steps', 1, 'Steps the trace holds (the bench\'s --steps).')
flags.DEFINE_integer('top', 25, 'Kernels to list.')
flags.DEFINE_string('hlo', '', 'Optimized HLO text of the traced program: also sum by JAX op.')


def trace_file(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz under it."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {path}')
  return found[-1]


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, shortened to the JAX operation's path."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
    op = re.sub(r'^jit\([^)]*\)/', '', m.group(2))
    names[m.group(1)] = re.sub(r'\[[^\]]*\]|\.\d+|_\d+\b', '', op)
  return names


def jax_op(event: dict, op_names: dict[str, str]) -> str:
  """The JAX operation an event's kernel came from, else the kernel's own name.

  Kernels replayed from a CUDA graph carry the command buffer as their `hlo_op`; XLA names a
  fusion's kernel after the fusion (`loop_add_fusion.8` -> `loop_add_fusion_8`), so the
  kernel name finds the instruction then. Library kernels in a graph (cuBLAS, cuDNN) keep
  their own names.
  """
  hlo_op = event.get('args', {}).get('hlo_op', '')
  if hlo_op and not hlo_op.startswith('command_buffer') and hlo_op in op_names:
    return op_names[hlo_op]
  name = event['name']
  return op_names.get(re.sub(r'_(\d+)$', r'.\1', name), op_names.get(name, name))


def device_events(path: str) -> list[dict]:
  """The complete ('X') events on the accelerator's tracks (on a CPU: XLA's op events)."""
  with gzip.open(trace_file(path)) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  device_pids = {e['pid'] for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and '/device:' in e['args'].get('name', '')}
  if device_pids:
    return [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids]
  return [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]


def summarize(events: list[dict], steps: int, key=lambda e: e['name']
              ) -> tuple[float, list[tuple[str, float, int]]]:
  """(device ms per step, [(key, ms per step, calls per step)] busiest first).

  `key(event)` names the row an event is charged to (default: the kernel's name).
  """
  total_us, calls = collections.Counter(), collections.Counter()
  for e in events:
    total_us[key(e)] += e['dur']
    calls[key(e)] += 1
  per_step = sum(total_us.values()) / 1e3 / steps
  rows = [(name, us / 1e3 / steps, calls[name] // steps) for name, us in total_us.most_common()]
  return per_step, rows


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m benchmarks.trace_summary TRACE_DIR_OR_FILE --steps=N')
  f = flags.FLAGS
  events = device_events(argv[1])
  per_step, rows = summarize(events, f.steps)
  print(f'device busy {per_step:.2f} ms/step (sum of kernel times over {f.steps} steps)')
  for name, ms, n in rows[:f.top]:
    print(f'{ms:9.3f} ms/step {n:6d} calls/step  {name[:100]}')
  if f.hlo:
    with open(f.hlo) as hlo:
      op_names = hlo_op_names(hlo.read())
    _, rows = summarize(events, f.steps, key=lambda e: jax_op(e, op_names))
    print('\nby JAX operation (op_name of the kernel\'s HLO instruction):')
    for name, ms, n in rows[:f.top]:
      print(f'{ms:9.3f} ms/step {n:6d} calls/step  {name[-140:]}')


if __name__ == '__main__':
  app.run(main)
