r"""Host preprocessing throughput: JPEG bytes -> decoded, padded, resized, normalized images.

  python -m lvm.data.bench [--size=336] [--num=200] [--aspect=pad] [--threads=1]

Encodes `num` photo-like JPEGs of LLaVA-typical sizes (COCO-like 640x480 and 500x375,
portrait, square) once, then times `images.load` (decode + RGB + pad/resize + crop +
normalize) over them. Prints samples/s by wall clock (total, and per thread used) and per
CPU-second of this process (`time.process_time`), which is the per-core figure that stays
honest on a machine shared with other work.
"""

import io
import time

from absl import app
from absl import flags
import concurrent.futures
import numpy as np
from PIL import Image

from lvm import config as config_lib
from lvm.data import images

_SIZE = flags.DEFINE_integer('size', 336, 'Output image side.')
_NUM = flags.DEFINE_integer('num', 200, 'Images to time.')
_ASPECT = flags.DEFINE_string('aspect', 'pad', 'pad | resize')
_THREADS = flags.DEFINE_integer('threads', 1, 'Worker threads (cores used).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed passes; the best is reported.')

SIZES = ((640, 480), (500, 375), (480, 640), (512, 512))


def make_jpegs(num, seed=0):
  """Smooth random images (JPEG-compressible like photos) at LLaVA-typical sizes."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    w, h = SIZES[i % len(SIZES)]
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-12, 13, (h, w, 3))
    im = Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def run(jpegs, size, aspect, threads, repeats):
  """Best (wall samples/s, samples per CPU-second) over `repeats` passes."""
  fn = lambda b: images.load(b, size, aspect, config_lib.CLIP_MEAN, config_lib.CLIP_STD)
  best_wall = best_cpu = 0.0
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    if threads > 1:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, jpegs))
    else:
      for b in jpegs:
        fn(b)
    best_wall = max(best_wall, len(jpegs) / (time.perf_counter() - start))
    best_cpu = max(best_cpu, len(jpegs) / (time.process_time() - cpu))
  return best_wall, best_cpu


def main(argv):
  del argv
  jpegs = make_jpegs(_NUM.value)
  mean_kb = np.mean([len(b) for b in jpegs]) / 1024
  rate, per_cpu = run(jpegs, _SIZE.value, _ASPECT.value, _THREADS.value, _REPEATS.value)
  print(f'{_NUM.value} JPEGs ({"/".join(f"{w}x{h}" for w, h in SIZES)}, mean {mean_kb:.0f} KiB) '
        f'-> float32[{_SIZE.value},{_SIZE.value},3] (decode, RGB, {_ASPECT.value}, bicubic '
        f'resize, center crop, normalize), best of {_REPEATS.value} passes:')
  print(f'wall clock: {rate:.1f} samples/s with {_THREADS.value} thread(s) = '
        f'{rate / _THREADS.value:.1f} samples/s per thread')
  print(f'CPU time:   {per_cpu:.1f} samples per CPU-second = samples/s per core')


if __name__ == '__main__':
  app.run(main)
