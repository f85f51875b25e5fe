"""Side by side on this CPU: one lvm train step against transformers' PyTorch LLaVA.

  python -m benchmarks.cpu_vs_transformers [--config=benchmarks/configs/cpu_small.py]
      [--rounds=6] [--block=4] [--threads=1] [--json]

Both sides train the same model on the same batch: transformers'
`LlavaForConditionalGeneration` is built from a local `LlavaConfig` with the lvm
config's sizes, loaded with the lvm parameters (so the losses must agree, which is
checked), and stepped with forward + backward + `torch.optim.AdamW` (eager, the
default foreach implementation, `torch.get_num_threads()` threads). lvm runs the
training loop's own jitted step (`lvm.step.jit_train_step`: loss + grad + AdamW from
`lvm.optim`), with the state donated.

Precision follows the config: `cpu_small.py` is float32 on both sides;
`cpu_small.py:dtype=bfloat16` is mixed precision on both sides (float32 weights and
optimizer; lvm computes in bfloat16 as on an accelerator, transformers runs under
`torch.autocast('cpu', bfloat16)`). Both use the CPU's bfloat16 matrix units where it
has them (AMX, AVX512-BF16).

Timing interleaves the two in blocks of `--block` steps for `--rounds` rounds, so
machine load hits both alike; the first step of each block is dropped (it pays for
the other framework's thread pool going idle). Prints the medians, spreads, and the
ratio torch / lvm (> 1: lvm is faster) of wall time and of process CPU time. With
`--threads=1` both run single-threaded, and CPU time measures the work done
independently of other jobs on the machine.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from lvm import bench
from lvm import synthetic
from lvm import losses as losses_lib
import lvm.hf

_CONFIG = config_flags.DEFINE_config_file('config', 'benchmarks/configs/cpu_small.py',
                                          'Config file[:args].', lock_config=True)
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Interleaved rounds.')
_BLOCK = flags.DEFINE_integer('block', 4, 'Steps per framework per round (first dropped).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_THREADS = flags.DEFINE_integer('threads', 0, 'Threads per framework (0: their defaults, all '
                                'cores). 1 makes CPU time a load-independent measure of work.')

_ONE_THREAD_XLA = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def torch_step_fn(config, params, batch):
  """(step() -> loss, initial loss): transformers LLaVA loaded with lvm's parameters."""
  if config.model.dtype not in ('float32', 'bfloat16') or config.model.param_dtype != 'float32':
    raise ValueError('the side-by-side runs float32 weights with float32 or bfloat16 compute; '
                     f'got model.dtype={config.model.dtype!r}, '
                     f'param_dtype={config.model.param_dtype!r}')
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlavaForConditionalGeneration  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  # The same weights through lvm's own export (the path tests/hf proves logit-equal).
  with tempfile.TemporaryDirectory() as hf_dir:
    lvm.hf.save(config.model, params, hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(
        hf_dir, torch_dtype=torch.float32, attn_implementation='sdpa').train()
  o = config.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  if config.data.max_images != 1:
    raise ValueError('the side-by-side supports one image per row')
  pixel_values = torch.from_numpy(np.ascontiguousarray(batch['images'][:, 0].transpose(0, 3, 1, 2)))
  input_ids = torch.from_numpy(batch['input_ids'].astype(np.int64))
  labels = torch.where(torch.from_numpy(batch['loss_mask']), input_ids, -100)
  attention_mask = torch.from_numpy(batch['attention_mask'].astype(np.int64))

  # A bfloat16 lvm config (float32 weights, bfloat16 compute) meets transformers' own mixed
  # precision: float32 weights under CPU autocast, as the HF Trainer's `bf16=True` runs it.
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16,
                                    enabled=config.model.dtype == 'bfloat16')

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      out = model(input_ids=input_ids, pixel_values=pixel_values,
                  attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())

  with torch.no_grad(), autocast():
    loss0 = float(model(input_ids=input_ids, pixel_values=pixel_values,
                        attention_mask=attention_mask, labels=labels).loss)
  return step, loss0, torch.get_num_threads()


def compare(config, rounds: int = 6, block: int = 4) -> dict:
  """Runs both steps interleaved; returns medians, spreads, losses and the ratio."""
  if block < 2:
    raise ValueError('--block must be >= 2 (the first step of each block is dropped)')
  b = bench.Bench(config)
  batch = synthetic.batch(config, config.train.batch_size, config.data.seq_len)
  params = b.init_params()
  num_params = bench._count(params)  # pylint: disable=protected-access
  torch_step, torch_loss0, threads = torch_step_fn(config, params, batch)
  sbatch = b.shard_batch(batch)
  with b.context():  # the trainer's loss (mean next-token cross-entropy) at the start
    lvm_loss0 = float(jax.jit(lambda p, x: losses_lib.loss_fn(
        p, x, model=b.model, num_tokens=jnp.sum(x['loss_mask'][:, 1:]))[0])(params, sbatch))
  state, step = b.train_step(params, sbatch)
  compiled, compile_s = bench.compile_timed(step, state, sbatch)
  holder = [state]

  def lvm_step():
    holder[0], metrics = compiled(holder[0], sbatch)
    return float(metrics['loss'])

  times = {'lvm': ([], []), 'torch': ([], [])}  # (wall, process CPU) seconds
  lvm_losses, torch_losses = [], []
  for _ in range(rounds):
    for name, fn, losses in (('lvm', lvm_step, lvm_losses),
                             ('torch', torch_step, torch_losses)):
      for i in range(block):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(fn())  # float() waits for the step to finish
        if i:
          times[name][0].append(time.perf_counter() - wall)
          times[name][1].append(time.process_time() - cpu)
  lvm_s, torch_s = bench.summarize(times['lvm'][0]), bench.summarize(times['torch'][0])
  lvm_cpu, torch_cpu = bench.summarize(times['lvm'][1]), bench.summarize(times['torch'][1])
  return {
      'params': num_params,
      'batch_size': config.train.batch_size, 'seq_len': config.data.seq_len,
      'dtype': config.model.dtype, 'lvm_step_s': lvm_s, 'torch_step_s': torch_s,
      'ratio_torch_over_lvm': torch_s['median'] / lvm_s['median'],
      'lvm_cpu_s': lvm_cpu, 'torch_cpu_s': torch_cpu,
      'cpu_time_ratio_torch_over_lvm': torch_cpu['median'] / lvm_cpu['median'],
      'initial_loss': {'lvm': lvm_loss0, 'torch': torch_loss0},
      'loss_after_steps': {'lvm': lvm_losses[-1], 'torch': torch_losses[-1],
                           'steps': len(lvm_losses)},
      'lvm_compile_s': compile_s, 'torch_threads': threads, 'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average': os.getloadavg(),
  }


def format_result(r: dict) -> str:
  ls, ts = r['lvm_step_s'], r['torch_step_s']
  row = lambda name, t: (f"  {name:<22} median {t['median'] * 1e3:7.1f} ms  p10 "
                         f"{t['p10'] * 1e3:7.1f}  p90 {t['p90'] * 1e3:7.1f}  ({t['n']} steps)")
  return '\n'.join([
      f"CPU train step, {r['params']:,} params, batch {r['batch_size']} x {r['seq_len']}, "
      f"{r['dtype']}, load average {r['load_average'][0]:.2f}",
      row('lvm (jax ' + r['jax'] + ')', ls),
      row(f"transformers (torch, {r['torch_threads']} thr)", ts),
      f"  initial loss           lvm {r['initial_loss']['lvm']:.5f}  torch "
      f"{r['initial_loss']['torch']:.5f}",
      f"  loss after {r['loss_after_steps']['steps']} steps    lvm "
      f"{r['loss_after_steps']['lvm']:.5f}  torch {r['loss_after_steps']['torch']:.5f}",
      f"  lvm compile            {r['lvm_compile_s']:.1f} s",
      f"  CPU time per step      lvm {r['lvm_cpu_s']['median'] * 1e3:.1f} ms  torch "
      f"{r['torch_cpu_s']['median'] * 1e3:.1f} ms  (ratio {r['cpu_time_ratio_torch_over_lvm']:.2f}x)",
      f"  ratio torch / lvm      {r['ratio_torch_over_lvm']:.2f}x wall time  (> 1: lvm faster)",
  ])


def main(argv):
  del argv
  if _THREADS.value:
    if _THREADS.value != 1:
      raise app.UsageError('--threads supports 0 (the defaults) or 1')
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(1)
    # XLA reads XLA_FLAGS when its CPU backend starts, which has not happened yet.
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_ONE_THREAD_XLA}".strip()
  r = compare(_CONFIG.value, _ROUNDS.value, _BLOCK.value)
  if abs(r['initial_loss']['lvm'] - r['initial_loss']['torch']) > 1e-3:
    raise SystemExit(f"the two models disagree: initial loss lvm {r['initial_loss']['lvm']} vs "
                     f"torch {r['initial_loss']['torch']}")
  print(json.dumps(r) if _JSON.value else format_result(r))


if __name__ == '__main__':
  app.run(main)
