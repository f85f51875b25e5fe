r"""Padding and training throughput with and without multimodal packing (lvm.data.packing).

  python -m benchmarks.packing [--data_dir=/tmp/packing_bench] [--train=2000] [--steps=8]

On the `shapes` demo (configs/shapes.py: its model, its data, its 104-token rows), for each
layout of the same training stream:
  * the padding fraction over `--batches` batches of the pipeline (tokens that are padding,
    and image slots that hold no image: the tower still runs on them);
  * the trainer's own jitted step (`lvm.bench.Bench`, every position scored so the layouts
    do the same work per token) on those real batches: real (non-padding) tokens per second
    of wall clock and per CPU-second of this process (the figure that stays honest on a
    shared machine).
Layouts (the same tokens per step): one sample per row at the demo's B x 104 (rows as long
as the longest sample), one sample per row at B/4 x 416 (rows ~5x the mean sample, as
LLaVA-1.5's 2048-token rows are to its samples), and the same B/4 x 416 rows packed (5 image
slots). A shapes sample is too long (~55-97 tokens) for two to share a 104-token row.
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import shapes
from lvm import bench
from lvm import data
from lvm import sharding
from lvm.data import pipeline

_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/packing_bench', 'Where shapes is prepared.')
_TRAIN = flags.DEFINE_integer('train', 2000, 'Training records of the shapes dataset.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Batches the padding is counted over.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed train steps per layout.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Rows of the unpacked layout.')

LAYOUTS = (  # name, rows / batch_size, seq_len multiple, packing, image slots
    ('unpacked', 1, 1, False, 0),  # the demo: rows as long as the longest sample
    ('unpacked_4x_long', 4, 4, False, 0),  # rows ~5x the mean sample, as LLaVA's 2048
    ('packed_4x_long', 4, 4, True, 5),  # the same rows, packed
)


def layout_config(name, rows_div, len_mul, packing, slots):
  del name
  config = shapes.get_config(f'train={_TRAIN.value},batch_size={_BATCH.value // rows_div},'
                             f'data_dir={_DATA_DIR.value}')
  config.data.seq_len *= len_mul
  config.data.packing = packing
  config.data.pack_max_images = slots
  config.data.prefetch = 0
  config.train.max_scored_tokens = 0
  return config


def padding(batches):
  """(token padding fraction, empty image-slot fraction, samples per batch)."""
  real = sum(int(b['attention_mask'].sum()) for b in batches)
  total = sum(b['attention_mask'].size for b in batches)
  slots = sum(b['images'].shape[0] * b['images'].shape[1] for b in batches)
  used = sum(int(np.abs(b['images']).reshape(*b['images'].shape[:2], -1).max(-1).astype(bool)
                 .sum()) for b in batches)
  samples = sum(int(b['segment_ids'].max(axis=1).sum()) if 'segment_ids' in b else
                int(b['attention_mask'].any(axis=1).sum()) for b in batches)
  return 1 - real / total, 1 - used / slots, samples / len(batches)


def throughput(config, batches):
  """(real tokens / s wall, real tokens / CPU-second, step seconds) of the trainer's step."""
  b = bench.Bench(config)
  batches = [b.shard_batch(x) for x in batches]
  with b.context():
    state, step = b.train_step(b.init_params(), batches[0])
    state, _ = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(_STEPS.value):
      batch = batches[i % len(batches)]
      state, metrics = step(state, batch)
      tokens += int(np.asarray(batch['attention_mask']).sum())
    jax.block_until_ready((state, metrics))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return tokens / wall, tokens / cpu, wall / _STEPS.value


def main(argv):
  del argv
  data.prepare(layout_config(*LAYOUTS[0]))
  print(f'shapes train={_TRAIN.value} records, configs/shapes.py model, {_STEPS.value} timed '
        f'steps per layout, {jax.device_count()} device(s)')
  print('layout          batch       pad_tokens  empty_slots  samples/batch  '
        'real_tok/s  real_tok/cpu_s  step_s')
  for layout in LAYOUTS:
    config = layout_config(*layout)
    mesh = sharding.make_mesh(config.mesh)
    it = pipeline.make_iterator(config, 'train', mesh)
    batches = [it.next_local() for _ in range(_BATCHES.value)]
    pad, empty, samples = padding(batches)
    rate, per_cpu, step_s = throughput(config, batches)
    shape = f'{config.train.batch_size}x{config.data.seq_len}'
    print(f'{layout[0]:15s} {shape:11s} {pad:10.1%}  {empty:11.1%}  {samples:13.1f}  '
          f'{rate:10.0f}  {per_cpu:14.0f}  {step_s:6.3f}')


if __name__ == '__main__':
  app.run(main)
