"""Training memory of a LLaVA-1.5 7B: full fine-tune vs LoRA vs LoRA on a quantized base.

  python -m benchmarks.memory [--size=7b] [--rank=128] [--batch=1] [--seq_len=2048]
                              [--compiled=small|tiny|none] [--plan] [--json]

Part 1 (no allocation): the train state of `configs/llava15.py:size=SIZE` as the trainer
builds it (`lvm.state.StateFactory`: `jax.eval_shape` over the real init, the optimizer's
init on the trainable subtree, frozen kernels quantized as `train.frozen_quantization`
says), counted in bytes:

  total = params + gradients + optimizer state + activations
  params      every leaf of the state's params (frozen base + trained modules + adapters)
  gradients   the trainable leaves, in their storage dtype (float32)
  optimizer   AdamW's mu and nu of the trainable leaves (float32) and its counters
  activations remat 'full' (the config's): the bf16 input of each scanned block kept for
              the backward, B*(L*D*layers_dec + P*Dv*layers_vis)*2, plus one decoder
              block recomputed, B*L*(6*D + 3*F)*2, plus the float32 logits and their
              gradient, B*L*V*4*2 (fused attention: no L*L term)

LoRA (`lvm` has it on another branch) is counted from the weight shapes: rank r on the
decoder's q/k/v/o and gate/up/down kernels adds A[d_in, r] and B[r, d_out] (float32) per
kernel and layer; its base is the stage-1 state (projector trained in full, as LLaVA's
LoRA recipe, at its own lr; vision tower and decoder frozen), with the frozen kernels in
the config's float32, in bf16 (`model.param_dtype`), or quantized to int8 / int4.

Part 2 (compiled, CPU): XLA's memory analysis of the jitted train step of a smaller
LLaVA-1.5-shaped config for the rows `lvm` can train today (full fine-tune; the frozen
base of LoRA in float32 / int8 / int4, i.e. stage 1 with and without
`frozen_quantization`): argument bytes (state + batch) beside Part 1's count of the same
state, and temporaries.
"""

import argparse
import json
import re
import sys

GIB = 1024 ** 3
LORA_TARGETS = r'^decoder/layers/(self_attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel$'
# A LLaVA-1.5-shaped model whose train step compiles on a CPU in seconds.
SMALL = dict(vision=dict(image_size=112, patch_size=14, width=256, depth=4, heads=4,
                         mlp_dim=1024),
             decoder=dict(width=512, depth=4, heads=8, kv_heads=8, mlp_dim=1376,
                          vocab_size=4096),
             seq_len=256, batch=2)


def llava15(size: str, stage: str, quantization: str = 'none', param_dtype: str = 'float32'):
  from configs import llava15  # pylint: disable=import-outside-toplevel
  config = llava15.get_config(f'size={size},stage={stage}')
  config.train.frozen_quantization = quantization
  config.model.param_dtype = param_dtype
  return config


def small(stage: str, quantization: str = 'none'):
  """`SMALL`'s shapes on LLaVA-1.5's recipe (remat full, bf16 compute, scanned layers)."""
  config = llava15('7b', stage, quantization)
  for k, v in SMALL['vision'].items():
    config.model.vision[k] = v
  for k, v in SMALL['decoder'].items():
    config.model.decoder[k] = v
  config.model.image_token_id, config.model.pad_token_id = 4000, 4001
  config.data.seq_len = SMALL['seq_len']
  config.train.batch_size = SMALL['batch']
  return config


def factory(config):
  """The trainer's `StateFactory` for `config` on one device (abstract: nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lvm import models, optim, sharding  # pylint: disable=import-outside-toplevel
  from lvm import state as state_lib  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx, _ = optim.make(config.optimizer, 1000)
  return state_lib.StateFactory(config, models.build(config), tx, mesh, sharding.rules(config))


def lora_params(f, rank: int) -> int:
  """Adapter parameters of rank `rank` on the LoRA targets: per kernel and layer
  r * (d_in + d_out), with d_in the product of its contraction axes (`lvm.quantize`)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from lvm import models, quantize  # pylint: disable=import-outside-toplevel
  from lvm import state as state_lib  # pylint: disable=import-outside-toplevel
  inputs = state_lib.dummy_inputs(f.config, 1)
  with jax.set_mesh(f.mesh), nn.logical_axis_rules(f.rules):
    boxed = jax.eval_shape(lambda r: models.build(f.config).init(r, *inputs)['params'],
                           jax.random.key(0))
  flat = traverse_util.flatten_dict(boxed, sep='/', is_leaf=lambda _, x: hasattr(x, 'names'))
  total = 0
  for path, leaf in flat.items():
    if not re.search(LORA_TARGETS, path):
      continue
    shape, names = leaf.value.shape, leaf.names
    contract = quantize.contraction_axes(names)
    layers = shape[0] if names[0] == 'layers' else 1
    d_in = _prod(shape[i] for i in contract)
    d_out = _prod(shape) // layers // d_in
    total += layers * rank * (d_in + d_out)
  if not total:
    raise ValueError(f'no parameter matches the LoRA targets {LORA_TARGETS!r}')
  return total


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out


def activation_bytes(config, batch: int) -> int:
  """The remat-'full' activations estimate of the module docstring, in bytes."""
  from lvm import models  # pylint: disable=import-outside-toplevel
  d, v = config.model.decoder, config.model.vision
  length = config.data.seq_len
  patches = models.num_image_tokens(config) * config.data.max_images
  saved = batch * (length * d.width * d.depth + patches * v.width * v.depth) * 2
  block = batch * length * (6 * d.width + 3 * d.mlp_dim) * 2
  logits = batch * length * d.vocab_size * 4 * 2
  return saved + block + logits


def state_row(key, name, f, adapters: int = 0, batch: int = 1) -> dict:
  """Bytes of one row: params, gradients, optimizer state, activations."""
  import jax  # pylint: disable=import-outside-toplevel
  from lvm import optim, quantize  # pylint: disable=import-outside-toplevel
  params = f.abstract['params']
  trainable, frozen = optim.split(params, f.trainable)
  adapter_bytes = adapters * 4  # float32, as the trained parameters
  row = {
      'key': key,
      'setting': name,
      'trainable_params': sum(x.size for x in jax.tree.leaves(trainable)) + adapters,
      'params': quantize.nbytes(params) + adapter_bytes,
      'frozen': quantize.nbytes(frozen),
      'gradients': quantize.nbytes(trainable) + adapter_bytes,
      'optimizer': quantize.nbytes(f.abstract['opt_state']) + 2 * adapter_bytes,
      'activations': activation_bytes(f.config, batch),
  }
  row['total'] = row['params'] + row['gradients'] + row['optimizer'] + row['activations']
  return row


def table(size: str, rank: int, batch: int, seq_len: int) -> list[dict]:
  """Part 1's rows for `configs/llava15.py:size=SIZE`."""
  def make(stage, quantization='none', param_dtype='float32'):
    config = llava15(size, stage, quantization, param_dtype)
    config.data.seq_len = seq_len
    return factory(config)

  full = make('finetune')
  base = make('pretrain')
  adapters = lora_params(base, rank)
  rows = [state_row('full', 'full fine-tune (vision frozen; float32 master weights)', full,
                    batch=batch),
          state_row('lora', f'LoRA r={rank}, float32 base', base, adapters, batch),
          state_row('lora_bf16', f'LoRA r={rank}, bf16 base', make('pretrain', param_dtype='bfloat16'),
                    adapters, batch),
          state_row('lora_int8', f'LoRA r={rank}, int8 base (frozen_quantization=int8)',
                    make('pretrain', 'int8'), adapters, batch),
          state_row('lora_int4', f'LoRA r={rank}, int4 base (frozen_quantization=int4)',
                    make('pretrain', 'int4'), adapters, batch)]
  # The bf16 row's trained projector is bf16 too; the optimizer and gradient columns
  # count it as the config stores it.
  return rows


# Part 2's rows: (name, stage, frozen_quantization).
COMPILED = (('full fine-tune', 'finetune', 'none'),
            ('frozen decoder + tower, float32', 'pretrain', 'none'),
            ('frozen decoder + tower, int8', 'pretrain', 'int8'),
            ('frozen decoder + tower, int4', 'pretrain', 'int4'))


def compiled_memory(config):
  """(StateFactory, XLA's memory analysis of the compiled train step) of `config` on this
  machine's first device; the arguments are abstract, so nothing is allocated."""
  import jax  # pylint: disable=import-outside-toplevel
  from lvm import synthetic  # pylint: disable=import-outside-toplevel
  from lvm import step as step_lib  # pylint: disable=import-outside-toplevel
  f = factory(config)
  batch = synthetic.batch(config, config.train.batch_size, config.data.seq_len)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  jitted = step_lib.jit_train_step(f, abstract_batch, **step_lib.step_options(config.train))
  return f, jitted.lower(f.abstract, abstract_batch).compile().memory_analysis()


def compiled_rows(kind: str, settings=COMPILED) -> list[dict]:
  """Part 2: XLA's memory analysis of the compiled train step of a smaller config."""
  from lvm import quantize  # pylint: disable=import-outside-toplevel
  rows = []
  for name, stage, quantization in settings:
    if kind == 'small':
      config = small(stage, quantization)
    else:
      config = llava15('tiny', stage, quantization)
      config.data.seq_len, config.train.batch_size = 64, 2
    f, m = compiled_memory(config)
    rows.append({'setting': name, 'counted_state': quantize.nbytes(f.abstract),
                 'arguments': int(m.argument_size_in_bytes),
                 'temporaries': int(m.temp_size_in_bytes),
                 'outputs': int(m.output_size_in_bytes)})
  return rows


# Part 3: remat policies of a full fine-tune, with the bf16 copy of the weights made once a
# step (`model.precast_weights`, the default). Without it XLA:CPU's analysis came out flat in
# the batch (126.8 GiB at batch 1 and 2), which says more about the CPU compile than a GPU's.
PLAN = (('full', True), ('dots_no_batch', True))
# One H200 (143,771 MiB) with 95% of it given to JAX, as `benchmarks/gpu_suite.py` runs.
H200_JAX_GIB = 143771 / 1024 * 0.95


def plan_rows(size: str, seq_len: int, budget_gib: float, settings=PLAN) -> list[dict]:
  """Part 3: the full fine-tune's compiled peak at batch 1 and 2 -> fixed bytes, bytes per
  sequence, and the largest batch whose peak fits `budget_gib`.

  peak = arguments (state + batch) + temporaries: the new state is written over the donated
  one (outputs alias arguments).
  """
  from lvm import quantize  # pylint: disable=import-outside-toplevel
  rows = []
  for policy, precast in settings:
    peaks = []
    for batch in (1, 2):
      config = llava15(size, 'finetune')
      config.data.seq_len, config.train.batch_size = seq_len, batch
      config.model.remat_policy, config.model.precast_weights = policy, precast
      f, m = compiled_memory(config)
      peaks.append(int(m.argument_size_in_bytes) + int(m.temp_size_in_bytes))
    per_sequence = peaks[1] - peaks[0]
    fixed = peaks[0] - per_sequence
    rows.append({'remat_policy': policy, 'precast_weights': precast,
                 'state': quantize.nbytes(f.abstract), 'fixed': fixed,
                 'per_sequence': per_sequence,
                 'max_batch': max(int((budget_gib * GIB - fixed) // per_sequence), 0)})
  return rows


def print_plan(rows, args, out=sys.stdout):
  import jax  # pylint: disable=import-outside-toplevel
  print(f'\nFull fine-tune of LLaVA-1.5 {args.size} on one device: compiled train step '
        f'({jax.devices()[0].platform} compile, sequences of {args.seq_len}), against '
        f'{args.budget_gib:.1f} GiB (GiB)', file=out)
  print('| remat | bf16 weight copy | state (params + AdamW) | fixed peak | per sequence '
        '| largest batch |', file=out)
  print('|---|---|---:|---:|---:|---:|', file=out)
  for r in rows:
    print(f"| {r['remat_policy']} | {'yes' if r['precast_weights'] else 'no'} | "
          f"{r['state'] / GIB:.2f} | {r['fixed'] / GIB:.2f} | {r['per_sequence'] / GIB:.2f} | "
          f"{r['max_batch']} |", file=out)
  print('peak(B) = arguments + temporaries of XLA\'s memory analysis; fixed = 2 peak(1) - '
        'peak(2), per sequence = peak(2) - peak(1); largest batch = (budget - fixed) // per '
        'sequence', file=out)


def print_table(rows, compiled, args, out=sys.stdout):
  gib = max(r['total'] for r in rows) > GIB
  unit, scale = ('GiB', GIB) if gib else ('MiB', 2 ** 20)
  _gib = lambda x: f'{x / scale:.2f}'
  print(f'LLaVA-1.5 {args.size} train state, per device without sharding; activations for '
        f'batch {args.batch} x {args.seq_len} tokens ({unit})', file=out)
  print('| setting | trainable params | params | gradients | optimizer | activations | total |',
        file=out)
  print('|---|---:|---:|---:|---:|---:|---:|', file=out)
  for r in rows:
    print(f"| {r['setting']} | {r['trainable_params'] / 1e6:,.1f} M | {_gib(r['params'])} | "
          f"{_gib(r['gradients'])} | {_gib(r['optimizer'])} | {_gib(r['activations'])} | "
          f"{_gib(r['total'])} |", file=out)
  print('total = params + gradients (trainable, float32) + AdamW mu, nu (trainable, float32) '
        '+ activations (remat full: B*(L*D*depth + P*Dv*depth_vis)*2 + B*L*(6D+3F)*2 '
        '+ B*L*V*4*2)', file=out)
  if compiled:
    print(f'\nCompiled train step, {args.compiled} config on CPU '
          '(XLA memory analysis, MiB)', file=out)
    print('| setting | state counted | arguments (state + batch) | temporaries |', file=out)
    print('|---|---:|---:|---:|', file=out)
    for r in compiled:
      print(f"| {r['setting']} | {r['counted_state'] / 2**20:.1f} | "
            f"{r['arguments'] / 2**20:.1f} | {r['temporaries'] / 2**20:.1f} |", file=out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='7b', help="configs/llava15.py size ('7b', '13b', 'tiny')")
  parser.add_argument('--rank', type=int, default=128)
  parser.add_argument('--batch', type=int, default=1, help='sequences per device (activations)')
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--compiled', default='small', choices=('small', 'tiny', 'none'))
  parser.add_argument('--plan', action='store_true',
                      help='also Part 3: remat policies of a full fine-tune on one device')
  parser.add_argument('--budget_gib', type=float, default=H200_JAX_GIB,
                      help="Part 3's device memory for JAX (default: 95%% of an H200)")
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  rows = table(args.size, args.rank, args.batch, args.seq_len)
  compiled = compiled_rows(args.compiled) if args.compiled != 'none' else []
  plan = plan_rows(args.size, args.seq_len, args.budget_gib) if args.plan else []
  if args.json:
    print(json.dumps({'rows': rows, 'compiled': compiled, 'plan': plan}))
  else:
    print_table(rows, compiled, args)
    if plan:
      print_plan(plan, args)
  return {'rows': rows, 'compiled': compiled, 'plan': plan}


if __name__ == '__main__':
  main()
