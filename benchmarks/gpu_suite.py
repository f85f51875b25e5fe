"""The GPU rows of docs/performance.md, each a `python -m lvm.bench` run in its own process.

  python -m benchmarks.gpu_suite --only=train_2b,prefill_7b,decode_7b --out=DIR
  python -m benchmarks.gpu_suite --list

One process per variant so that each starts with an empty device (no allocator state or
compiled executables carried over) and a variant that runs out of memory fails alone. Each
report is written to DIR/NAME.json (the bench's `--json` object) and a table of all of them is
printed last: step time, MFU against the peak table and against the matmul rate measured on
the same card (`--measure_peak`), peak memory, and for decode the bandwidth limit.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_CONFIG = 'benchmarks/configs/gpu_llava15.py'
_TRAIN = ['--mode=train', '--gpu_flags', '--measure_peak', '--steps=20', '--warmup=3']
_BF16_WEIGHTS = ['--config.model.param_dtype=bfloat16']  # inference: weights stored in bf16
_7B = 'size=7b,batch_size=1,seq_len=640'  # one image (576 tokens) + a 64-token prompt
_PREFILL = ['--mode=prefill', '--measure_peak', '--steps=20'] + _BF16_WEIGHTS
_DECODE = ['--mode=decode', '--decode_len=128', '--steps=64'] + _BF16_WEIGHTS
_ACCUM4 = _TRAIN + ['--config.train.grad_accum_steps=4']  # with batch_size=32: 4 x 8

# A scanned layer's weights are a dynamic slice of the stacked [layers, ...] arrays; without
# this XLA copies each slice before its matmul (more bytes than the matmul reads at batch 1).
_DSF = '--xla_gpu_enable_dynamic_slice_fusion=true'
_CUBLAS = '--xla_gpu_enable_triton_gemm=false'
_CUBLAS_DSF = _CUBLAS + ' ' + _DSF
# The forward's dot outputs that remat saves are written into the scan's stacked residuals
# through a copy each (run 14 trace: 9 a layer). Dynamic-slice fusion lets a GEMM write its
# slice in place, but it takes legacy cuBLAS GEMM custom calls, not cuBLASLt's.
_LEGACY_DSF = '--xla_gpu_enable_cublaslt=false ' + _DSF
_UNROLL = '--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL'

# name -> (config args, extra flags[, extra XLA flags]). Training: CLIP ViT-L/14-336
# (frozen) + LLaMA decoder trained in full, bf16 compute, float32 master weights and AdamW.
# `train_2b` is the fastest setting found (runs 22-23); the other train variants scan the
# layers unless their name says unscanned, unrolled or acts.
VARIANTS = {
    # Unrolled layers: no scan residual stacks (their zero fill and the copies of the saved dot
    # outputs into them, ~23 ms a step in the run-14 trace) and no per-layer weight slices;
    # every activation saved (no forward op rerun), q/k/v and gate/up each one GEMM, cuBLAS
    # for every GEMM, and batch 10, the most that fits this way (batch 12: out of memory).
    'train_2b': ('size=2b,scan=0,remat=dots_flash_activations,fuse=1,batch_size=10', _TRAIN,
                 _CUBLAS),
    # `train_2b` of runs 18-21: cuDNN attention's outputs saved, so its forward runs once.
    'train_2b_flash_unrolled': ('size=2b,scan=0,remat=dots_no_batch_flash', _TRAIN),
    'train_2b_scanned': ('size=2b', _TRAIN),  # `train_2b` of runs 1-17
    'train_2b_remat_none': ('size=2b,remat=none', _TRAIN),
    'train_2b_remat_dots': ('size=2b,remat=dots', _TRAIN),
    'train_2b_remat_full': ('size=2b,remat=full', _TRAIN),
    # dots_no_batch + cuDNN attention's outputs saved: no second attention forward.
    'train_2b_remat_flash': ('size=2b,remat=dots_no_batch_flash', _TRAIN),
    # LLaVA-1.5's global batch is 128: on one GPU that is gradient accumulation, which
    # spreads the optimizer update (memory-bound, 16 bytes a parameter) over microbatches.
    'train_2b_accum4': ('size=2b,batch_size=32', _ACCUM4),
    # ... and the norm outputs, post-RoPE q/k and the SwiGLU product: no forward op rerun.
    'train_2b_remat_acts': ('size=2b,remat=dots_flash_activations', _TRAIN),
    'train_2b_remat_acts_legacy_dsf': ('size=2b,remat=dots_flash_activations', _TRAIN,
                                       _LEGACY_DSF),
    'train_2b_scanned_no_precast': ('size=2b',
                                    _TRAIN + ['--config.model.precast_weights=false']),
    'train_2b_legacy_cublas': ('size=2b', _TRAIN, '--xla_gpu_enable_cublaslt=false'),
    'train_2b_legacy_dsf': ('size=2b', _TRAIN, _LEGACY_DSF),
    'train_2b_remat_flash_accum4': ('size=2b,remat=dots_no_batch_flash,batch_size=32', _ACCUM4),
    'train_2b_xla_attention': ('size=2b,attention=xla', _TRAIN),
    'train_2b_unscanned': ('size=2b,scan=0', _TRAIN),
    # Unrolled, the q/k/v/o weight gradients became Triton GEMMs (run 16 trace: 0.38 ms each
    # against 0.33 ms for cuBLAS when scanned). Run 19: 412.7 ms, no change from run 18.
    'train_2b_cublas_only': ('size=2b,scan=0,remat=dots_no_batch_flash', _TRAIN,
                             '--xla_gpu_enable_triton_gemm=false'),
    # Unrolled with every activation saved (no forward op rerun: without a scan stack to copy
    # them into, saving them is cheaper than recomputing), cuBLAS for every GEMM.
    'train_2b_acts': ('size=2b,scan=0,remat=dots_flash_activations', _TRAIN, _CUBLAS),
    # ... with q/k/v and gate/up each one GEMM over concatenated kernels.
    'train_2b_acts_fused': ('size=2b,scan=0,remat=dots_flash_activations,fuse=1', _TRAIN,
                            _CUBLAS),
    'train_2b_acts_fused_triton': ('size=2b,scan=0,remat=dots_flash_activations,fuse=1',
                                   _TRAIN),
    'train_2b_batch16': ('size=2b,batch_size=16', _TRAIN),
    'train_1b': ('size=1b', _TRAIN),
    'train_1b_remat_none': ('size=1b,remat=none', _TRAIN),
    'train_3b': ('size=3b', _TRAIN),
    'train_2b_dynamic_slice_fusion': ('size=2b', _TRAIN, _DSF),
    'train_2b_no_triton_gemm': ('size=2b', _TRAIN, '--xla_gpu_enable_triton_gemm=false'),
    'train_2b_cublas_dsf': ('size=2b', _TRAIN, _CUBLAS_DSF),
    'train_3b_batch4': ('size=3b,batch_size=4', _TRAIN),
    'train_3b_batch4_remat_flash': ('size=3b,batch_size=4,remat=dots_no_batch_flash', _TRAIN),
    # LLaVA-1.5-7B stage 2 (decoder + projector trained in full, float32 master weights and
    # AdamW) on one H200: params and AdamW take 76.7 GiB, the float32 gradients 25.2 and the
    # bf16 weight copy 13.2, so what is left of JAX's 133 GiB bounds the batch (`python -m
    # benchmarks.memory --plan`). Gradient accumulation would add a 25.2 GiB float32 sum.
    'train_7b_full_b6': ('size=7b,remat=full,batch_size=6', _TRAIN),
    'train_7b_full_b4': ('size=7b,remat=full,batch_size=4', _TRAIN),
    # No forward rerun (every dot and cuDNN attention's outputs saved), at the batch that
    # fits; without the weight copy (cast per layer) there is room for two more sequences.
    'train_7b_flash_b2': ('size=7b,remat=dots_no_batch_flash,batch_size=2', _TRAIN),
    'train_7b_flash_b4_nocast': ('size=7b,remat=dots_no_batch_flash,batch_size=4',
                                 _TRAIN + ['--config.model.precast_weights=false']),
    # `train_2b` on packed rows of LLaVA-665K-like samples (`lvm.synthetic.packed_rows`): MFU
    # counts the real tokens, each attending within its sample, and the real images only.
    # Packed rows pass a [B, 1, L, L] segment mask to attention, which cuDNN's flash kernel
    # takes as a bias over every position (XLA's attention is the fallback to compare).
    'train_2b_packed': ('size=2b,scan=0,remat=dots_flash_activations,fuse=1,batch_size=10',
                        _TRAIN + ['--config.data.packing=true'], _CUBLAS),
    'train_2b_packed_xla_attention': (
        'size=2b,scan=0,remat=dots_no_batch,fuse=1,batch_size=8,attention=xla',
        _TRAIN + ['--config.data.packing=true'], _CUBLAS),
    # LLaVA-NeXT-shaped stage 2 (`lvm.synthetic.anyres_rows`: photos, 16:9, square and page
    # sizes on llava-v1.6's grids, 4096-token rows), tower trained too: MFU on the tiles the
    # images have (most take all 5).
    'train_2b_next': ('size=2b,anyres=1,stage=full,seq_len=4096,batch_size=4,scan=0,'
                      'remat=dots_flash_activations,fuse=1', _TRAIN, _CUBLAS),
    # Time to first token.
    'prefill_7b': (_7B, _PREFILL),
    # Batch-1 decode of the 7B decoder against weight bytes / measured copy bandwidth.
    'decode_7b': (_7B, _DECODE),
    'decode_7b_dynamic_slice_fusion': (_7B, _DECODE, _DSF),
    'decode_7b_unrolled_loop': (_7B, _DECODE, _UNROLL),
    'prefill_7b_dynamic_slice_fusion': (_7B, _PREFILL, _DSF),
    # cuBLAS instead of Triton GEMMs, so that dynamic-slice fusion lets each GEMM read its
    # layer's weights in place in the scanned stack (no per-layer copy; docs/performance.md).
    'decode_7b_cublas': (_7B, _DECODE, _CUBLAS_DSF),
    'prefill_7b_cublas': (_7B, _PREFILL, _CUBLAS_DSF),
    'prefill_7b_unscanned': (_7B + ',scan=0', _PREFILL),
    'decode_7b_xla_attention': (_7B + ',attention=xla', _DECODE),
    'decode_7b_unscanned': (_7B + ',scan=0', _DECODE),
    # Unrolled layers read their weights as whole arrays: no dynamic slice to fuse.
    'decode_7b_unscanned_cublas': (_7B + ',scan=0', _DECODE, _CUBLAS),
}

flags.DEFINE_list('only', ['train_2b', 'prefill_7b', 'decode_7b'], 'Variants to run, in order.')
flags.DEFINE_string('out', '', 'Folder for NAME.json and NAME.log (default: no files).')
flags.DEFINE_integer('timeout', 420, 'Seconds allowed to one variant.')
flags.DEFINE_bool('list', False, 'Print the variants and their commands, run nothing.')


# JAX takes 75% of device memory by default; a benchmark process owns the device, and the
# training variants that keep more activations (remat none, batch 16, accumulation) need more.
MEM_FRACTION = '0.95'


def xla_flags(name) -> str:
  """The variant's extra XLA_FLAGS ('' for none)."""
  return VARIANTS[name][2] if len(VARIANTS[name]) > 2 else ''


def command(name):
  config_args, extra = VARIANTS[name][:2]
  return [sys.executable, '-m', 'lvm.bench', f'--config={_CONFIG}:{config_args}', '--json',
          *extra]


def described(name) -> str:
  """The variant as a shell command line."""
  xla = f'XLA_FLAGS="{xla_flags(name)}" ' if xla_flags(name) else ''
  return (f'XLA_PYTHON_CLIENT_MEM_FRACTION={MEM_FRACTION} ' + xla +
          ' '.join(['python'] + command(name)[1:]))


def run(name, out, timeout):
  start = time.time()
  try:
    env = dict(os.environ)
    env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', ''), xla_flags(name)]).strip()
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = MEM_FRACTION
    p = subprocess.run(command(name), capture_output=True, text=True, timeout=timeout,
                       check=False, env=env)
    stdout, stderr, rc = p.stdout, p.stderr, p.returncode
  except subprocess.TimeoutExpired as e:
    text = lambda b: b.decode(errors='replace') if isinstance(b, bytes) else (b or '')
    stdout, stderr, rc = text(e.stdout), text(e.stderr) + f'\ntimeout after {timeout} s', 'timeout'
  if out:
    with open(os.path.join(out, f'{name}.log'), 'w') as f:
      f.write(stdout + '\n--- stderr\n' + stderr)
  report = None
  for line in reversed(stdout.splitlines()):
    if line.startswith('{'):
      report = json.loads(line)
      break
  if report is None:
    last = [l for l in stderr.splitlines() if l.strip()][-3:]
    print(f'{name}: FAILED (rc {rc}, {time.time() - start:.0f} s): ' + ' | '.join(last),
          flush=True)
    return None
  report['variant'] = name
  report['command'] = described(name)
  report['wall_s'] = time.time() - start
  if out:
    with open(os.path.join(out, f'{name}.json'), 'w') as f:
      json.dump(report, f, indent=1)
  print(f'{name}: done in {report["wall_s"]:.0f} s', flush=True)
  return report


def row(r):
  t = r['step_s']
  mem = r['memory'].get('peak_bytes_in_use')
  cells = [r['variant'], f"{t['median'] * 1e3:.1f} ({t['p10'] * 1e3:.1f}-{t['p90'] * 1e3:.1f})",
           f"{r['tokens_per_s']:.0f}", f"{r['achieved_tflops']:.1f}",
           f"{100 * r['mfu']:.1f}%" if r.get('mfu') is not None else 'n/a',
           (f"{100 * r['mfu_vs_measured_matmul']:.1f}% of "
            f"{r['measured_matmul_tflops_per_device']:.0f}")
           if 'mfu_vs_measured_matmul' in r else '-',
           f'{mem / 2 ** 30:.1f}' if mem else '-', f"{r['compile_s']:.0f}"]
  if 'decode_tokens_per_s_per_row' in r:
    cells.append(f"{r['decode_tokens_per_s_per_row']:.1f} tok/s vs limit "
                 f"{r['bandwidth_limit_tokens_per_s_per_row']:.1f}"
                 + (f" ({100 * r['fraction_of_bandwidth_limit']:.0f}%)"
                    if 'fraction_of_bandwidth_limit' in r else ''))
  return '| ' + ' | '.join(cells) + ' |'


def main(argv):
  del argv
  f = flags.FLAGS
  unknown = [n for n in f.only if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f'unknown variants {unknown}; known: {sorted(VARIANTS)}')
  if f.list:
    for name in VARIANTS:
      print(f'{name}: {described(name)}')
    return
  if f.out:
    os.makedirs(f.out, exist_ok=True)
  reports = [r for r in (run(n, f.out, f.timeout) for n in f.only) if r]
  print('| variant | step ms median (p10-p90) | tokens/s | TFLOP/s | MFU (989) | MFU vs matmul '
        '| peak GiB | compile s | decode |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in reports:
    print(row(r))
  if reports:
    print(f"device: {reports[0].get('device')}, jax {reports[0].get('jax')}")


if __name__ == '__main__':
  app.run(main)
