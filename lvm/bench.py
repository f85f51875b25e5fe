"""Benchmarks: step time, throughput, model FLOPs, MFU, compile time and memory.

  python -m lvm.bench --config=benchmarks/configs/cpu_small.py --mode=train --steps=20
  python -m lvm.bench --config=benchmarks/configs/gpu_llava15.py:size=2b --mode=train --json

Modes, each timing the very function the rest of lvm runs (one compile path):
  train    the trainer's own step (`lvm.step.jit_train_step`: forward, backward, AdamW
           update, jitted as one donated function, state from `lvm.state.StateFactory`)
           on a synthetic batch of the config's shape.
  prefill  `lvm.generate.Generator.prefill`: fills the KV cache for images + prompt and
           samples the first token (time to first token when batch_size=1).
  decode   `lvm.generate.Generator.decode`: one token per row with the KV cache (tokens/s =
           batch / step time); also reports the bandwidth limit: measured copy bandwidth /
           bytes a step reads (decoder weights + the KV cache's filled slots).

Timing: `--warmup` steps after compilation are discarded, then `--steps` steps are
each timed to completion (`block_until_ready` on every output), and the median, the
10th/90th percentiles, min and max are reported. Compile time is `lower().compile()`
measured separately, so it never leaks into the step time.

Model FLOPs follow DESIGN.md ("Counting FLOPs for MFU"), counted on the batch's full
shape (every position of every row, as the device computes them); see
`lvm.flops.model_flops`.
MFU = model FLOPs per step / step time / peak; the peak is the device's dense bf16
rate from `lvm.flops.PEAK_TFLOPS` (none on CPU, so no MFU is claimed there). `--measure_peak`
also times a large matmul on the same device and reports MFU against that rate.
"""

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from lvm import flops as flops_lib
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm import synthetic
import lvm.models

# XLA flags for a GPU training step (set before the backend starts; --gpu_flags).
# The latency-hiding scheduler overlaps collectives and copies with compute.
GPU_XLA_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',)

def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- steps


class Bench:
  """The trainer's state and step, and the generator's functions, for one config.

  Args:
    config: the full config.
    devices: the mesh's devices (default: all).
    total_steps: the optimizer schedule's length (its learning rates do not change the
      timing).
  """

  def __init__(self, config, devices=None, total_steps: int = 1000):
    self.config = config
    self.model = lvm.models.build(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config)
    self.batch_size = config.train.batch_size
    self.seq_len = config.data.seq_len
    tx, _ = optim.make(config.optimizer, total_steps)
    self.factory = state_lib.StateFactory(config, self.model, tx, self.mesh, self.rules)

  def context(self):
    return step_lib.mesh_context(self.mesh, self.rules)

  def shard_batch(self, batch):
    return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim))
            for k, v in batch.items()}

  def init_params(self):
    """Random params created straight into their shardings (the trainer's init)."""
    return self.factory.random_params(jax.random.key(0))

  def train_step(self, params, batch) -> tuple[dict, step_lib.JittedStep]:
    """(state, the trainer's jitted step): `lvm.step.jit_train_step` with the config's
    options, as `lvm.train` builds it. `params` are consumed (donated into the state)."""
    state = self.factory.from_params(params)
    step = step_lib.jit_train_step(self.factory, batch,
                                   **step_lib.step_options(self.config.train))
    return state, step

  def generator(self, params):
    """The `lvm.generate.Generator` of these params on this mesh (its own jitted functions)."""
    from lvm import generate  # pylint: disable=g-import-not-at-top
    return generate.Generator(self.config, params, mesh=self.mesh)


# --------------------------------------------------------------------------- timing


def summarize(times: list[float]) -> dict[str, float]:
  """Median, 10th/90th percentiles, min and max of a list of seconds."""
  arr = np.asarray(times)
  return {'median': float(np.median(arr)), 'p10': float(np.percentile(arr, 10)),
          'p90': float(np.percentile(arr, 90)), 'min': float(arr.min()),
          'max': float(arr.max()), 'n': int(arr.size)}


def compile_timed(jitted, *args, **kwargs):
  """(compiled executable, seconds spent lowering + compiling)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - start


def memory_stats(compiled, device) -> dict[str, Any]:
  """Peak device bytes where the runtime counts them (GPU/TPU), else XLA's estimate."""
  out = {}
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_bytes_in_use'] = int(stats['peak_bytes_in_use'])
  try:
    m = compiled.memory_analysis()
    out['compiled_bytes'] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes)
    out['temp_bytes'] = int(m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass  # Not every backend implements memory_analysis.
  return out


def time_steps(run: Callable[[], Any], steps: int, warmup: int,
               trace_dir: str | None = None) -> list[float]:
  """Seconds per call of `run` (which must return the outputs to wait for).

  With `trace_dir`, the timed calls run under `jax.profiler.trace` (a Perfetto trace too), so
  their times include the profiler's overhead: compare traced runs only with traced runs.
  """
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  with (jax.profiler.trace(trace_dir, create_perfetto_trace=True) if trace_dir
        else contextlib.nullcontext()):
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - start)
  return times


def matmul_tflops(device, n: int | None = None, dtype=None, reps: int = 10) -> float:
  """Achieved TFLOP/s of an n x n x n matmul on `device` (bf16 on accelerators)."""
  accel = device.platform != 'cpu'
  n = n or (8192 if accel else 1024)
  dtype = dtype or (jnp.bfloat16 if accel else jnp.float32)
  # Random operands: constant ones or zeros can run faster than real data.
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
  f = jax.jit(lambda a, b: a @ b)
  times = time_steps(lambda: f(a, b), reps, 2)
  return 2 * n ** 3 / float(np.median(times)) / 1e12


def copy_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
  """Achieved bytes/s of a device-to-device array copy (read + write counted)."""
  nbytes = nbytes or (2 ** 30 if device.platform != 'cpu' else 2 ** 26)
  x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
  f = jax.jit(lambda x: x + 1.0)  # one read and one write per element
  times = time_steps(lambda: f(x), reps, 2)
  return 2 * nbytes / float(np.median(times))


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_read_bytes(params, cache, batch: int, filled: int) -> dict[str, int]:
  """Bytes one decode step must read from device memory: the roofline's numerator.

  weights: every decoder parameter once (LM head included) except the input embedding, of
    which only the `batch` fed rows (all of it when the head is tied to it); the vision
    tower and projector are not run.
  kv_cache: keys and values of the `filled` slots of each row (the prompt and the tokens
    so far) in the cache's layout {'k', 'v': [layers, batch, slots, kv_heads, head_dim]}.
  kv_cache_allocated: the same over every slot of the cache buffer, which attention reads
    masked when it does not skip the empty tail.
  """
  decoder = params['decoder']
  weights = tree_bytes(decoder)
  embed = decoder.get('embed_tokens')
  if embed is not None and 'lm_head' in decoder:
    weights -= tree_bytes(embed) - batch * embed.shape[-1] * embed.dtype.itemsize
  allocated = tree_bytes(cache)
  slots = cache['k'].shape[2]
  return {'weights': weights, 'kv_cache': allocated * min(filled, slots) // slots,
          'kv_cache_allocated': allocated}


# --------------------------------------------------------------------------- modes


def run(config, mode: str = 'train', steps: int = 10, warmup: int = 2,
        measure_peak: bool = False, decode_len: int = 0,
        trace_dir: str | None = None) -> dict[str, Any]:
  """Benchmarks one mode of `config`; returns the report as a dict.

  `trace_dir`: write a `jax.profiler` trace of the timed steps there (their times then
  include the profiler's overhead).
  """
  if mode not in ('train', 'prefill', 'decode'):
    raise ValueError(f"mode must be 'train', 'prefill' or 'decode', got {mode!r}")
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  bench = Bench(config)
  device = bench.mesh.devices.flat[0]
  num_devices = bench.mesh.devices.size
  b, l = bench.batch_size, bench.seq_len
  if b % num_devices and mode == 'train':
    raise ValueError(f'config.train.batch_size {b} must be divisible by the {num_devices} '
                     'devices of the mesh')
  batch = synthetic.batch(config, b, l, packed=mode == 'train' and config.data.get('packing'))
  report = {'mode': mode, 'device': device.device_kind, 'platform': device.platform,
            'num_devices': int(num_devices), 'batch_size': b, 'seq_len': l,
            'dtype': config.model.dtype, 'scan_layers': bool(config.model.scan_layers),
            'remat_policy': config.model.remat_policy,
            'attention_impl': config.model.attention_impl, 'jax': jax.__version__}
  # FLOPs first: counting traces the model outside the mesh/rules context.
  if mode == 'decode':
    # Attention cost grows with the cache position; count the middle of the timed span.
    flops = flops_lib.model_flops(config, b, l, 'decode', cache_len=l + warmup + steps // 2)
  elif 'segment_ids' in batch:  # packed rows: MFU on the real tokens and images only
    samples = flops_lib.segment_lengths(batch['segment_ids'])
    real_images = int(flops_lib.real_image_slots(batch))
    flops = flops_lib.model_flops(config, b, l, mode, samples=samples, images=real_images)
    report['packed'] = {'samples': sum(map(len, samples)), 'images': real_images,
                        'image_slots': int(np.prod(batch['images'].shape[:2])),
                        'padding': 1 - flops['tokens'] / (b * l)}
  elif 'image_sizes' in batch:  # anyres: the tower counted on the images' own tiles only
    real_tiles = int(flops_lib.real_image_slots(batch))
    flops = flops_lib.model_flops(config, b, l, mode, tiles=real_tiles)
    report['anyres'] = {'real_tiles': real_tiles,
                        'tile_slots': int(np.prod(batch['images'].shape[:3]))}
  else:
    flops = flops_lib.model_flops(config, b, l, mode)
  start = time.perf_counter()
  params = bench.init_params()
  jax.block_until_ready(params)
  report['init_s'] = time.perf_counter() - start  # compiling and running the random init
  report['params'] = _count(params)
  sbatch = bench.shard_batch(batch)
  if mode == 'train':
    state, step = bench.train_step(params, sbatch)
    del params  # donated into the state
    compiled, report['compile_s'] = compile_timed(step, state, sbatch)
    holder = [state]

    def one():
      holder[0], metrics = compiled(holder[0], sbatch)
      return holder[0], metrics

    times = time_steps(one, steps, warmup, trace_dir)
    report['loss'] = float(one()[1]['loss'])
    tokens = flops['tokens']  # packed rows: the real tokens
  else:
    gen = bench.generator(params)
    rep = lambda x: jax.device_put(x, sharding.replicated(bench.mesh))
    # Greedy: temperature 0, no top-k, top-p 1 (the generator's defaults).
    knobs = (rep(np.float32(0.0)), rep(np.int32(0)), rep(np.float32(1.0)))
    args = (gen.params, sbatch['images'], sbatch['input_ids'], sbatch['attention_mask'],
            rep(jax.random.key(0)), *knobs)
    # An anyres model also takes each image's size (every tile slot runs: no tile budget).
    sizes = {'image_sizes': sbatch['image_sizes']} if 'image_sizes' in sbatch else {}
    decode_len = decode_len or (16 if mode == 'prefill' else 64)
    with bench.context():
      if mode == 'prefill':
        compiled, report['compile_s'] = compile_timed(gen.prefill, *args, new_bucket=decode_len,
                                                      **sizes)
        times = time_steps(lambda: compiled(*args, **sizes), steps, warmup, trace_dir)
        tokens = b * l
      else:
        total = warmup + steps + 1
        if total > decode_len:
          raise ValueError(f'decode: warmup + steps + 1 = {total} tokens exceed --decode_len '
                           f'{decode_len}; raise --decode_len')
        token, cache, full_mask, next_pos, rng = gen.prefill(*args, new_bucket=decode_len,
                                                             **sizes)
        # Cache slots and positions of every decoded token, made before the timing.
        index = [rep(np.int32(l + i)) for i in range(total)]
        positions = [next_pos + i for i in range(total)]
        compiled, report['compile_s'] = compile_timed(
            gen.decode, gen.params, token, cache, index[0], full_mask, positions[0], rng, *knobs)
        holder = [token, cache, rng, 0]

        def one():
          token, cache, rng, i = holder
          token, cache, rng = compiled(gen.params, token, cache, index[i], full_mask,
                                       positions[i], rng, *knobs)
          holder[:] = [token, cache, rng, i + 1]
          return token, cache

        times = time_steps(one, steps, warmup, trace_dir)
        tokens = b
        # The timed steps' slots filled, at the middle of the span (as the FLOPs count).
        read = decode_read_bytes(gen.params, holder[1], b, l + warmup + steps // 2)
        report['decode_read_bytes'] = read
        report['weight_bytes'] = read['weights']
  report['memory'] = memory_stats(compiled, device)
  if mode == 'decode':
    # Outside the mesh context: a single-device copy. A decode step reads the decoder's
    # weights once and every row's KV cache, so steps/s <= bandwidth / those bytes.
    bw = copy_bandwidth(device)
    read = report['decode_read_bytes']
    report['copy_bandwidth_GBps'] = bw / 1e9
    report['bandwidth_limit_tokens_per_s_per_row'] = bw / (read['weights'] + read['kv_cache'])
    report['bandwidth_limit_formula'] = (
        'measured copy bytes/s / (decoder weight bytes + KV cache bytes of the filled slots '
        'of every row)')

  t = summarize(times)
  report['step_s'] = t
  report['samples_per_s'] = b / t['median'] if mode != 'decode' else None
  report['tokens_per_s'] = tokens / t['median']
  report['model_flops_per_step'] = flops['total']
  report['model_flops_parts'] = flops['parts']
  report['flops_formula'] = flops['formula']
  achieved = flops['total'] / t['median']
  report['achieved_tflops'] = achieved / 1e12
  peak = flops_lib.peak_tflops(device)
  report['peak_tflops_per_device'] = peak
  report['mfu'] = flops_lib.mfu(flops['total'], t['median'], num_devices, peak) if peak else None
  if measure_peak:
    measured = matmul_tflops(device)
    report['measured_matmul_tflops_per_device'] = measured
    report['mfu_vs_measured_matmul'] = achieved / (measured * 1e12 * num_devices)
  if mode == 'decode':
    report['decode_tokens_per_s_per_row'] = 1.0 / t['median']
    report['fraction_of_bandwidth_limit'] = (
        report['decode_tokens_per_s_per_row'] / report['bandwidth_limit_tokens_per_s_per_row'])
  report['load_average'] = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  return report


def format_report(r: dict[str, Any]) -> str:
  t = r['step_s']
  lines = [
      f"lvm.bench mode={r['mode']} device={r['device']} x{r['num_devices']} "
      f"dtype={r['dtype']} scan={r['scan_layers']} remat={r['remat_policy']} "
      f"attention={r['attention_impl']} jax={r['jax']}",
      f"  params            {r['params']:,}",
      f"  batch x length    {r['batch_size']} x {r['seq_len']}",
      f"  compile time      {r['compile_s']:.2f} s  (random init {r['init_s']:.2f} s)",
      f"  step time         median {t['median'] * 1e3:.2f} ms  (p10 {t['p10'] * 1e3:.2f}, "
      f"p90 {t['p90'] * 1e3:.2f}, min {t['min'] * 1e3:.2f}, max {t['max'] * 1e3:.2f}; "
      f"{t['n']} steps)",
  ]
  if 'anyres' in r:
    lines.append(f"  anyres tiles      {r['anyres']['real_tiles']} real of "
                 f"{r['anyres']['tile_slots']} slots (FLOPs and MFU count the real ones)")
  if 'packed' in r:
    pk = r['packed']
    lines.append(f"  packed rows       {pk['samples']} samples, {100 * pk['padding']:.1f}% padding, "
                 f"{pk['images']} images in {pk['image_slots']} slots (tokens/s, FLOPs and "
                 'MFU count the real tokens and images)')
  if r['samples_per_s'] is not None:
    lines.append(f"  samples/s         {r['samples_per_s']:.2f}")
  lines.append(f"  tokens/s          {r['tokens_per_s']:.1f}")
  if 'decode_tokens_per_s_per_row' in r:
    read = r['decode_read_bytes']
    lines.append(f"  decode tokens/s/row {r['decode_tokens_per_s_per_row']:.1f}  "
                 f"({100 * r['fraction_of_bandwidth_limit']:.1f}% of the bandwidth limit "
                 f"{r['bandwidth_limit_tokens_per_s_per_row']:.1f} = "
                 f"{r['copy_bandwidth_GBps']:.1f} GB/s copy / ({read['weights'] / 1e9:.4g} GB "
                 f"weights + {read['kv_cache'] / 1e9:.4g} GB KV cache; "
                 f"{read['kv_cache_allocated'] / 1e9:.4g} GB allocated))")
  lines.append(f"  model FLOPs/step  {r['model_flops_per_step']:.4g}  "
               f"({r['achieved_tflops']:.3f} TFLOP/s achieved)")
  lines.append(f"    = {r['flops_formula']}")
  if r['mfu'] is not None:
    lines.append(f"  MFU               {100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:.0f} "
                 f"TFLOP/s x {r['num_devices']}")
  else:
    lines.append('  MFU               n/a (no known peak for this device)')
  if 'mfu_vs_measured_matmul' in r:
    lines.append(f"  MFU vs matmul     {100 * r['mfu_vs_measured_matmul']:.1f}% of "
                 f"{r['measured_matmul_tflops_per_device']:.1f} TFLOP/s measured")
  mem = r['memory']
  if 'peak_bytes_in_use' in mem:
    lines.append(f"  peak memory       {mem['peak_bytes_in_use'] / 2 ** 30:.2f} GiB per device")
  if 'compiled_bytes' in mem:
    lines.append(f"  compiled memory   {mem['compiled_bytes'] / 2 ** 30:.3f} GiB "
                 '(XLA estimate: arguments + outputs + temporaries)')
  if r.get('loss') is not None:
    lines.append(f"  loss              {r['loss']:.4f}")
  return '\n'.join(lines)


# --------------------------------------------------------------------------- main

def define_flags():
  """The command-line flags (defined on demand so that importing lvm.bench defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Config file[:args].', lock_config=True)
  flags.DEFINE_enum('mode', 'train', ['train', 'prefill', 'decode'], 'What to time.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_integer('decode_len', 0, 'KV cache room past the prompt (0: 16 for prefill, '
                       '64 for decode).')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.')
  flags.DEFINE_bool('measure_peak', False, 'Also time a large matmul and report MFU against it.')
  flags.DEFINE_bool('gpu_flags', False, 'Add GPU_XLA_FLAGS to XLA_FLAGS.')
  flags.DEFINE_string('profile_dir', '', 'Write a jax.profiler (and Perfetto) trace of the timed '
                      'steps to this folder; their times then include profiling overhead.')


def main(argv):
  del argv
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError('--config is required, e.g. --config=benchmarks/configs/cpu_small.py')
  if f.gpu_flags:
    # XLA reads XLA_FLAGS when the backend starts, which has not happened yet.
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *GPU_XLA_FLAGS]).strip()
  report = run(f.config, f.mode, steps=f.steps, warmup=f.warmup, measure_peak=f.measure_peak,
               decode_len=f.decode_len, trace_dir=f.profile_dir or None)
  print(json.dumps(report) if f.json else format_report(report))
  sys.stdout.flush()


if __name__ == '__main__':
  define_flags()
  app.run(main)
