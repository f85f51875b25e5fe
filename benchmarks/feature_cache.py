r"""Stage-1 step time with the live tower and with cached features (lvm.data.feature_cache).

  python -m benchmarks.feature_cache [--steps=10] [--batch_size=8]

1. On this machine: the trainer's jitted stage-1 step (`lvm.bench.Bench`: projector trained,
   tower and decoder frozen) on a small CLIP + LLaMA whose tower is a realistic share of the
   step (a 112 px, 14 px-patch tower of 6 layers at width 384 before a 4-layer decoder at
   width 384, 256-token rows), once on `images` and once on the tower's features of the
   same images (`image_features`, what `python -m lvm.features_cache` stores); the two
   losses are printed to show they are the same step. Medians of `--steps` steps, wall
   clock and CPU seconds of this process.
2. The model FLOPs of both steps by `lvm.flops` (DESIGN.md's rule), the vision share, and the
   speed-up the share predicts, 1 / (1 - vision share), beside the measured one.
3. LLaVA-1.5-7B stage 1 (configs/llava15.py:size=7b,stage=pretrain) counted the same way at
   the config's 2048-token rows, and at 640 (576 image tokens and a caption: about the rows
   of LLaVA's own stage 1, which pads each batch to its longest sample), with the cache's
   size: 576 x 1024 x 2 bytes (bfloat16) per image, x 558,128 images for LCS-558K; and the
   same tower before a Qwen2-0.5B-shaped decoder, where the tower weighs more.
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import llava15
from lvm import bench
from lvm import synthetic
from lvm import config as base
from lvm import flops
from lvm import models

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per variant.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Rows per step.')

LCS_558K = 558_128  # images of LLaVA-1.5's stage-1 set (blip_laion_cc_sbu_558k.json)


def bench_config(cached: bool):
  config = base.get_config()
  config.model.vision = base.vision_config('clip', image_size=112, patch_size=14, width=384,
                                           depth=6, heads=6, mlp_dim=1536)
  config.model.decoder = base.decoder_config(vocab_size=1024, width=384, depth=4, heads=6,
                                             kv_heads=6, mlp_dim=1024)
  config.model.image_token_id, config.model.pad_token_id = 1000, 1001
  config.model.dtype = 'float32'  # bfloat16 matmuls are slow on a CPU
  config.model.remat_policy = 'none'
  config.data.seq_len = 256
  config.train.stage = 'pretrain'
  config.train.batch_size = _BATCH.value
  config.mesh.data = -1
  if cached:  # only the FLOP count reads it: the benchmark feeds the features itself
    config.data.vision_features_cache = '/unused'
  return config


def time_step(b, batch):
  """(median wall s, median CPU s, first loss) of the trainer's step on `batch`."""
  batch = b.shard_batch(batch)
  with b.context():
    state, step = b.train_step(b.init_params(), batch)
    state, metrics = step(state, batch)  # compile
    loss = float(metrics['loss'])
    walls, cpus = [], []
    for _ in range(_STEPS.value):
      wall, cpu = time.perf_counter(), time.process_time()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      walls.append(time.perf_counter() - wall)
      cpus.append(time.process_time() - cpu)
  return float(np.median(walls)), float(np.median(cpus)), loss


def vision_share(config, seq_len):
  counts = flops.model_flops(config, config.train.batch_size, seq_len)
  return counts['parts']['vision'] / counts['total'], counts


def main(argv):
  del argv
  live_config = bench_config(cached=False)
  batch = synthetic.batch(live_config, _BATCH.value, live_config.data.seq_len)
  b = bench.Bench(live_config)
  params = jax.device_get(b.init_params())
  images = batch['images']
  tower = models.build_vision(live_config)
  feats = jax.jit(lambda p, x: tower.apply({'params': p}, x))(
      params['vision'], images.reshape(-1, *images.shape[2:]))
  cached_batch = {**{k: v for k, v in batch.items() if k != 'images'},
                  'image_features': np.asarray(feats).reshape(*images.shape[:2],
                                                              *feats.shape[1:])}
  live = time_step(b, batch)
  cached = time_step(b, cached_batch)
  share, counts = vision_share(live_config, live_config.data.seq_len)
  print(f'{jax.devices()[0].device_kind} x {jax.device_count()}, batch {_BATCH.value} x '
        f'{live_config.data.seq_len} tokens, {_STEPS.value} steps (medians)')
  print(f'  live tower:      {live[0] * 1e3:8.1f} ms/step wall  {live[1] * 1e3:8.1f} ms CPU  '
        f'loss {live[2]:.6f}')
  print(f'  cached features: {cached[0] * 1e3:8.1f} ms/step wall  {cached[1] * 1e3:8.1f} ms CPU'
        f'  loss {cached[2]:.6f}')
  print(f'  measured speed-up: {live[0] / cached[0]:.2f}x wall, {live[1] / cached[1]:.2f}x CPU')
  print(f'  model FLOPs/step {counts["total"]:.4g}, vision {counts["parts"]["vision"]:.4g} '
        f'({share:.1%}); predicted speed-up 1 / (1 - share) = {1 / (1 - share):.2f}x')
  print(f'  formula: {counts["formula"]}')

  seven = llava15.get_config('size=7b,stage=pretrain')
  per_image = 576 * 1024 * 2
  print('LLaVA-1.5-7B stage 1 (configs/llava15.py:size=7b,stage=pretrain), per step of '
        f'{seven.train.batch_size} samples:')
  for seq_len in (seven.data.seq_len, 640):
    share, counts = vision_share(seven, seq_len)
    print(f'  L={seq_len}: {counts["total"]:.4g} FLOPs/step, vision {counts["parts"]["vision"]:.4g}'
          f' ({share:.1%}): cached at most {1 / (1 - share):.2f}x faster')
  small = llava15.get_config('size=7b,stage=pretrain')
  small.model.decoder = base.decoder_config('qwen2', width=896, depth=24, heads=14, kv_heads=2,
                                            mlp_dim=4864, vocab_size=151936,
                                            tie_embeddings=True)
  share, counts = vision_share(small, 640)
  print(f'  the same tower before a Qwen2-0.5B-shaped decoder, L=640: vision {share:.1%} of '
        f'{counts["total"]:.4g} FLOPs/step: cached at most {1 / (1 - share):.2f}x faster')
  print(f'  cache: {per_image:,} bytes per image (576 x 1024 x bfloat16); LCS-558K '
        f'({LCS_558K:,} images): {per_image * LCS_558K / 1e9:,.0f} GB')


if __name__ == '__main__':
  app.run(main)
