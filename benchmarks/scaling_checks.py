"""Scaling checks that need no accelerator.

  python -m benchmarks.scaling_checks [--check=compile,fsdp] [--json]

1. Compile time: the jitted train step (loss + grad + AdamW) of a 32-layer decoder
   with `scan_layers` compiles within 1.5x the time of a 2-layer one (a scanned stack
   is one loop body, so depth must not multiply compile time).
2. FSDP memory: on 8 (emulated) devices with `mesh.fsdp=8`, every device holds 1/8 of
   the parameter and optimizer-state bytes, within 2%.

Both start from `configs/tiny.py`. Compile time is measured as process CPU time
(robust to other jobs on a shared machine) and wall time; the best of `repeats`
compilations is kept. Prints one line per check and exits non-zero if one fails.
"""

import json
import os
import sys
import time

_DEVICES_FLAG = '--xla_force_host_platform_device_count'


def _tiny(arg=''):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config(arg)


def compile_seconds(config, repeats: int = 2) -> dict[str, float]:
  """Best-of-`repeats` CPU and wall seconds to lower + compile the train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from lvm import bench, synthetic  # pylint: disable=g-import-not-at-top
  b = bench.Bench(config)
  batch = synthetic.batch(config, config.train.batch_size, config.data.seq_len)
  sbatch = b.shard_batch(batch)
  state, step = b.train_step(b.init_params(), sbatch)
  cpu, wall = [], []
  for _ in range(repeats):
    jax.clear_caches()
    c0, w0 = time.process_time(), time.perf_counter()
    step.lower(state, sbatch).compile()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
  return {'cpu_s': min(cpu), 'wall_s': min(wall)}


def check_compile(depth_small: int = 2, depth_large: int = 32, limit: float = 1.5,
                  repeats: int = 2) -> dict:
  """Compile-time ratio of a `depth_large` to a `depth_small` scanned decoder."""
  result = {}
  for depth in (depth_small, depth_large):
    config = _tiny('scan=1')
    config.model.decoder.depth = depth
    result[depth] = compile_seconds(config, repeats)
  ratio = result[depth_large]['cpu_s'] / result[depth_small]['cpu_s']
  return {'check': 'compile', 'depths': [depth_small, depth_large],
          'cpu_s': [result[depth_small]['cpu_s'], result[depth_large]['cpu_s']],
          'wall_s': [result[depth_small]['wall_s'], result[depth_large]['wall_s']],
          'ratio': ratio, 'limit': limit, 'ok': ratio <= limit}


def device_bytes(tree) -> dict[int, int]:
  """Bytes each device holds of the arrays in `tree` (its addressable shards)."""
  out = {}
  import jax  # pylint: disable=g-import-not-at-top
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def check_fsdp(num_devices: int = 8, tolerance: float = 0.02) -> dict:
  """Per-device share of parameters + optimizer state under mesh.fsdp=num_devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from lvm import bench, synthetic  # pylint: disable=g-import-not-at-top
  if jax.device_count() < num_devices:
    raise RuntimeError(f'check_fsdp needs {num_devices} devices, found {jax.device_count()}; '
                       f'set XLA_FLAGS={_DEVICES_FLAG}={num_devices} before jax starts')
  config = _tiny('scan=1')
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, num_devices, 1
    config.train.stage = 'full'
  b = bench.Bench(config, jax.devices()[:num_devices])
  batch = synthetic.batch(config, config.train.batch_size, config.data.seq_len)
  sbatch = b.shard_batch(batch)
  state, step = b.train_step(b.init_params(), sbatch)
  state, _ = step(state, sbatch)  # the step must keep the layout
  tree = {'params': state['params'], 'opt_state': state['opt_state']}
  total = sum(int(x.nbytes) for x in jax.tree.leaves(tree))
  per_device = device_bytes(tree)
  worst = max(abs(v * num_devices / total - 1) for v in per_device.values())
  return {'check': 'fsdp', 'num_devices': num_devices, 'total_bytes': total,
          'per_device_bytes': sorted(per_device.values()),
          'max_deviation_from_1/n': worst, 'tolerance': tolerance, 'ok': worst <= tolerance}


def format_result(r: dict) -> str:
  status = 'OK  ' if r['ok'] else 'FAIL'
  if r['check'] == 'compile':
    return (f"{status} compile time, scanned decoder depth {r['depths'][1]} vs "
            f"{r['depths'][0]}: {r['cpu_s'][1]:.2f} s / {r['cpu_s'][0]:.2f} s CPU = "
            f"{r['ratio']:.2f}x (limit {r['limit']}x; wall {r['wall_s'][1]:.2f} s / "
            f"{r['wall_s'][0]:.2f} s)")
  return (f"{status} FSDP on {r['num_devices']} devices: params + optimizer state "
          f"{r['total_bytes']:,} bytes, per device {min(r['per_device_bytes']):,}.."
          f"{max(r['per_device_bytes']):,} = 1/{r['num_devices']} within "
          f"{100 * r['max_deviation_from_1/n']:.2f}% (limit {100 * r['tolerance']:.0f}%)")


def main(argv):
  checks = ['compile', 'fsdp']
  as_json = False
  for arg in argv[1:]:
    if arg.startswith('--check='):
      checks = arg.split('=', 1)[1].split(',')
    elif arg == '--json':
      as_json = True
    else:
      raise SystemExit(f'unknown argument {arg!r}; usage: python -m benchmarks.scaling_checks '
                       '[--check=compile,fsdp] [--json]')
  if _DEVICES_FLAG not in os.environ.get('XLA_FLAGS', ''):
    # Set before jax starts its backend (nothing has imported jax yet).
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  fns = {'compile': check_compile, 'fsdp': check_fsdp}
  ok = True
  for name in checks:
    if name not in fns:
      raise SystemExit(f'unknown check {name!r}; known: {sorted(fns)}')
    r = fns[name]()
    ok &= r['ok']
    print(json.dumps(r) if as_json else format_result(r), flush=True)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
