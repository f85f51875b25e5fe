"""Benchmarks: step time, throughput, model FLOPs, MFU, compile time and memory.

  python -m lvm.bench --config=benchmarks/configs/cpu_small.py --mode=train --steps=20
  python -m lvm.bench --config=benchmarks/configs/gpu_llava15.py:size=2b --mode=train --json

Modes:
  train    one optimizer step (forward, backward, AdamW update, jitted as one donated
           function) on a synthetic batch of the config's shape.
  prefill  the forward pass that fills the KV cache for images + prompt (time to first
           token when batch_size=1).
  decode   one token per row with the KV cache (tokens/s = batch / step time); also
           reports the bandwidth limit: measured copy bandwidth / bytes of the weights.

Timing: `--warmup` steps after compilation are discarded, then `--steps` steps are
each timed to completion (`block_until_ready` on every output), and the median, the
10th/90th percentiles, min and max are reported. Compile time is `lower().compile()`
measured separately, so it never leaks into the step time.

Model FLOPs follow DESIGN.md ("Counting FLOPs for MFU"), counted on the batch's full
shape (every position of every row, as the device computes them); see `model_flops`.
MFU = model FLOPs per step / step time / peak; the peak is the device's dense bf16
rate from `lvm.flops.PEAK_TFLOPS` (none on CPU, so no MFU is claimed there). `--measure_peak`
also times a large matmul on the same device and reports MFU against that rate.
"""

import contextlib
import functools
import json
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from lvm import sharding
from lvm.flops import peak_tflops  # re-exported: bench reports MFU against it
import lvm.models

# XLA flags for a GPU training step (set before the backend starts; --gpu_flags).
# The latency-hiding scheduler overlaps collectives and copies with compute.
GPU_XLA_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',)

# --------------------------------------------------------------------------- FLOPs


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_flops(config, batch_size: int, seq_len: int, mode: str = 'train',
                cache_len: int = 0) -> dict[str, Any]:
  """Model FLOPs of one step (DESIGN.md's rule, as `lvm.flops` counts it) and the formula.

  train: `lvm.flops` with the config's trainable stage. prefill: the same count with
  nothing trainable (forward only). decode: one token per row, 2 x N_dec plus
  attention to `cache_len` keys, 4 x layers x heads x head_dim x cache_len (no causal
  halving).

  Returns:
    dict with 'total', 'parts' (decoder, vision, projector), 'tokens' and 'formula'.
  """
  from lvm import flops as flops_lib, optim  # pylint: disable=g-import-not-at-top
  regex = optim.trainable_regex(config.train) if mode == 'train' else r'$^'  # $^: nothing
  per_token = flops_lib.per_token(config, seq_len, regex)
  if mode == 'decode':
    d = config.model.decoder
    attn_width = d.depth * d.heads * (d.head_dim or d.width // d.heads)
    n_dec = per_token['n_decoder']
    parts = {'decoder': batch_size * (2 * n_dec + 4 * attn_width * cache_len), 'vision': 0,
             'projector': 0}
    formula = (f'B x (2 x N_dec + 4 x layers x heads x head_dim x S) = {batch_size} x '
               f'(2 x {n_dec:,} + 4 x {attn_width} x {cache_len})')
    tokens = batch_size
  else:
    per_image = flops_lib.per_image(config, regex)
    images = batch_size * config.data.max_images
    parts = {'decoder': batch_size * seq_len * per_token['total'],
             'vision': images * per_image['vision'], 'projector': images * per_image['projector']}
    formula = (f"B*L x ({per_token['formula']}) + B*N x ({per_image['formula']}); "
               f'B={batch_size} L={seq_len} N={config.data.max_images}')
    scored = int(config.train.get('max_scored_tokens', 0)) if mode == 'train' else 0
    if scored:  # the LM head runs at P positions of a row, not L
      head = flops_lib.lm_head_per_position(config, regex)
      parts['decoder'] -= batch_size * (seq_len - scored) * head['total']
      formula += (f" - B x (L - P) x {head['mult']} x N_head; P={scored} "
                  f"N_head={head['n_head']:,}")
    tokens = batch_size * seq_len
  return {'total': int(sum(parts.values())), 'parts': parts, 'tokens': tokens,
          'formula': formula}


# --------------------------------------------------------------------------- inputs


def synthetic_batch(config, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the pipeline's shapes: each row starts with its images' tokens, then text.

  Text ids avoid the image and pad ids; the loss covers every text token after the
  first. Returns numpy arrays (images f32[B, N, H, W, 3], input_ids i32[B, L],
  loss_mask / attention_mask bool[B, L]).
  """
  c = config.model
  rng = np.random.default_rng(seed)
  n_img = config.data.max_images
  p = lvm.models.num_image_tokens(config)
  if n_img * p >= seq_len:
    raise ValueError(f'seq_len {seq_len} leaves no room for text after {n_img} x {p} image '
                     'tokens; raise config.data.seq_len')
  size = c.vision.image_size
  images = rng.standard_normal((batch_size, n_img, size, size, 3), dtype=np.float32)
  special = {c.image_token_id, c.pad_token_id}
  vocab = c.decoder.vocab_size
  ids = rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)
  for s in special:  # move accidental special ids onto an ordinary one
    ids[ids == s] = min(set(range(len(special) + 1)) - special)
  ids[:, :n_img * p] = c.image_token_id
  loss_mask = np.zeros((batch_size, seq_len), bool)
  loss_mask[:, n_img * p + 1:] = True
  attention_mask = np.ones((batch_size, seq_len), bool)
  return {'images': images, 'input_ids': ids, 'loss_mask': loss_mask,
          'attention_mask': attention_mask}


# --------------------------------------------------------------------------- steps


def cross_entropy(logits, input_ids, loss_mask):
  """Mean next-token cross-entropy (float32) over loss_mask positions.

  (A custom-VJP version with a one-pass softmax - onehot backward and shifted targets
  instead of sliced logits measured no faster on CPU; see docs/performance.md.)

  Args:
    logits: float[B, L, V]; logits[:, t] predicts input_ids[:, t + 1].
    input_ids: int[B, L].
    loss_mask: bool[B, L], True where input_ids[:, t] is a supervised target.

  Returns:
    float32 scalar.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logit) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Bench:
  """Builds the model, sharded parameters and jitted step functions for one config."""

  def __init__(self, config, devices=None):
    self.config = config
    self.model = lvm.models.build(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config)
    self.batch_size = config.train.batch_size
    self.seq_len = config.data.seq_len

  def context(self):
    return _Context(self.mesh, self.rules)

  def shard_batch(self, batch):
    return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim))
            for k, v in batch.items()}

  def init_params(self, batch):
    """Abstract init, then a jitted init straight into the sharded layout."""
    images, ids = batch['images'][:1], batch['input_ids'][:1]
    with self.context():
      abstract = jax.eval_shape(lambda r: self.model.init(r, images, ids)['params'],
                                jax.random.PRNGKey(0))
      shardings = sharding.logical_shardings(abstract, self.mesh, self.rules)
      init = functools.partial(lvm.models.random_params, self.config.model,
                               images=images, input_ids=ids)
      return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))

  def train_step_fn(self, params, total_steps: int = 1000):
    """(state, jitted step) from `lvm.train`: the training loop's own step and state.

    `lvm.train.train_step` (loss + grad + optimizer update of the trainable subtree)
    jitted with the state's shardings in and out and the state donated, exactly as
    `lvm.train.jit_train_step` does, but returned as a jit object so that it can be
    lowered and compiled separately (call it inside `self.context()`; call this
    method outside it). `params` are consumed (donated into the state).
    """
    from lvm import optim, train  # pylint: disable=g-import-not-at-top
    tx, _ = optim.make(self.config.optimizer, total_steps)
    factory = train.StateFactory(self.config, self.model, tx, self.mesh, self.rules)
    state = factory.from_params(params)
    t = self.config.train
    step_fn = functools.partial(train.train_step, model=self.model, tx=tx,
                                trainable=factory.trainable, z_loss=t.z_loss,
                                accum_steps=t.grad_accum_steps,
                                scored_tokens=int(t.get('max_scored_tokens', 0)))
    batch_shardings = {k: sharding.batch_sharding(self.mesh, n) for k, n in
                       (('images', 5), ('input_ids', 2), ('loss_mask', 2),
                        ('attention_mask', 2))}
    jitted = jax.jit(step_fn, in_shardings=(factory.shardings, batch_shardings),
                     out_shardings=(factory.shardings, sharding.replicated(self.mesh)),
                     donate_argnums=(0,))
    return state, jitted

  def prefill_fn(self, cache_len: int):
    model = self.model

    def prefill(params, images, input_ids, attention_mask):
      b, l = input_ids.shape
      cache = model.decoder.init_cache(b, cache_len)
      # The mask spans the cache; slots past the prompt are hidden by causality anyway and
      # must read as real once decoding writes them.
      attention_mask = jnp.concatenate(
          [attention_mask, jnp.ones((b, cache_len - l), attention_mask.dtype)], axis=1)
      logits, cache = model.apply({'params': params}, images, input_ids, attention_mask, None,
                                  cache, jnp.zeros((), jnp.int32), method='forward')
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return jax.jit(prefill)

  def decode_fn(self):
    model = self.model

    def decode(params, tokens, cache, index):
      logits, cache = model.apply({'params': params}, tokens[:, None], cache, index,
                                  method='decode')
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache, index + 1

    return jax.jit(decode, donate_argnums=(2,))


class _Context:
  """`with` the mesh and the logical axis rules."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)


# --------------------------------------------------------------------------- timing


def summarize(times: list[float]) -> dict[str, float]:
  """Median, 10th/90th percentiles, min and max of a list of seconds."""
  arr = np.asarray(times)
  return {'median': float(np.median(arr)), 'p10': float(np.percentile(arr, 10)),
          'p90': float(np.percentile(arr, 90)), 'min': float(arr.min()),
          'max': float(arr.max()), 'n': int(arr.size)}


def compile_timed(jitted, *args):
  """(compiled executable, seconds spent lowering + compiling)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
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
  batch = synthetic_batch(config, b, l)
  report = {'mode': mode, 'device': device.device_kind, 'platform': device.platform,
            'num_devices': int(num_devices), 'batch_size': b, 'seq_len': l,
            'dtype': config.model.dtype, 'scan_layers': bool(config.model.scan_layers),
            'remat_policy': config.model.remat_policy,
            'attention_impl': config.model.attention_impl, 'jax': jax.__version__}
  # FLOPs first: counting traces the model outside the mesh/rules context.
  if mode == 'decode':
    # Attention cost grows with the cache position; count the middle of the timed span.
    flops = model_flops(config, b, l, 'decode', cache_len=l + warmup + steps // 2)
  else:
    flops = model_flops(config, b, l, mode)
  start = time.perf_counter()
  params = bench.init_params(batch)
  jax.block_until_ready(params)
  report['init_s'] = time.perf_counter() - start  # compiling and running the random init
  report['params'] = _count(params)
  if mode == 'train':
    # Built outside the rules context: StateFactory unboxes abstract values itself.
    state, step = bench.train_step_fn(params)
    del params
  with bench.context():
    sbatch = bench.shard_batch(batch)
    if mode == 'train':
      compiled, report['compile_s'] = compile_timed(step, state, sbatch)
      holder = [state]

      def one():
        holder[0], metrics = compiled(holder[0], sbatch)
        return holder[0], metrics

      times = time_steps(one, steps, warmup, trace_dir)
      report['loss'] = float(one()[1]['loss'])
      tokens = b * l
    elif mode == 'prefill':
      decode_len = decode_len or 16
      prefill = bench.prefill_fn(l + decode_len)
      args = (params, sbatch['images'], sbatch['input_ids'], sbatch['attention_mask'])
      compiled, report['compile_s'] = compile_timed(prefill, *args)
      times = time_steps(lambda: compiled(*args), steps, warmup, trace_dir)
      tokens = b * l
    else:
      decode_len = decode_len or 64
      cache_len = l + decode_len
      prefill = bench.prefill_fn(cache_len)
      tokens_, cache = prefill(params, sbatch['images'], sbatch['input_ids'],
                               sbatch['attention_mask'])
      decode = bench.decode_fn()
      index = jnp.asarray(l, jnp.int32)
      compiled, report['compile_s'] = compile_timed(decode, params, tokens_, cache, index)
      holder = [tokens_, cache, index]
      total = warmup + steps + 1
      if total > decode_len:
        raise ValueError(f'decode: warmup + steps + 1 = {total} tokens exceed --decode_len '
                         f'{decode_len}; raise --decode_len')

      def one():
        holder[:] = compiled(params, *holder)
        return holder

      times = time_steps(one, steps, warmup, trace_dir)
      tokens = b
      report['weight_bytes'] = tree_bytes(params)
    report['memory'] = memory_stats(compiled, device)
  if mode == 'decode':
    # Outside the mesh context: a single-device copy. Batch-1 decode reads every weight
    # once per token, so tokens/s <= bandwidth / weight bytes.
    bw = copy_bandwidth(device)
    report['copy_bandwidth_GBps'] = bw / 1e9
    report['bandwidth_limit_tokens_per_s_per_row'] = bw / report['weight_bytes']

  t = summarize(times)
  report['step_s'] = t
  report['samples_per_s'] = b / t['median'] if mode != 'decode' else None
  report['tokens_per_s'] = tokens / t['median']
  report['model_flops_per_step'] = flops['total']
  report['model_flops_parts'] = flops['parts']
  report['flops_formula'] = flops['formula']
  achieved = flops['total'] / t['median']
  report['achieved_tflops'] = achieved / 1e12
  peak = peak_tflops(device)
  report['peak_tflops_per_device'] = peak
  report['mfu'] = achieved / (peak * 1e12 * num_devices) if peak else None
  if measure_peak:
    measured = matmul_tflops(device)
    report['measured_matmul_tflops_per_device'] = measured
    report['mfu_vs_measured_matmul'] = achieved / (measured * 1e12 * num_devices)
  if mode == 'decode':
    report['decode_tokens_per_s_per_row'] = 1.0 / t['median']
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
  if r['samples_per_s'] is not None:
    lines.append(f"  samples/s         {r['samples_per_s']:.2f}")
  lines.append(f"  tokens/s          {r['tokens_per_s']:.1f}")
  if 'decode_tokens_per_s_per_row' in r:
    lines.append(f"  decode tokens/s/row {r['decode_tokens_per_s_per_row']:.1f}  (bandwidth "
                 f"limit {r['bandwidth_limit_tokens_per_s_per_row']:.1f}: "
                 f"{r['weight_bytes'] / 1e9:.3f} GB weights / "
                 f"{r['copy_bandwidth_GBps']:.1f} GB/s copy)")
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
