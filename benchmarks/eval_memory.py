"""Peak memory and speed of `lvm.evaluate.run` as the benchmark grows (tiny model, CPU).

Writes a POPE-layout benchmark of N generated questions (tiny PNGs, reused across
questions: every question still decodes and preprocesses its own image), answers it with a
tiny random LLaVA, and records the resident set before the run and its peak during the run
(sampled every 5 ms), for each N in --counts. The first count is preceded by a warm-up run
(compilation, thread pools), so every measured run starts from the same settled process.
Memory is flat when the growth does not scale with N; the harness before streaming kept
every preprocessed image (12 KiB per question at the tiny model's 32 px, 48 KiB at
--image_size=64).

  python benchmarks/eval_memory.py                       # 2,000 and 20,000 questions
  python benchmarks/eval_memory.py --counts=200,2000 --batch_size=64

Prints one line per count and the growth difference; --out writes the numbers as JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lvm.eval import stream  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_IMAGE_FILES = 16


def tiny_text_generator(data_dir: str, mesh=None, seed: int = 0, image_size: int = 32):
  """(config, TextGenerator): configs/tiny.py with random weights and the shapes tokenizer.

  Args:
    data_dir: where the shapes tokenizer is trained (once; nothing is downloaded).
    mesh: the generation mesh (default: every device on the data axis).
    seed: the weights' seed (every process of a multi-process run passes the same one).
    image_size: the vision tower's input size (patches grow with it: always 4x4 tokens).
  """
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from lvm import generate, inference  # pylint: disable=g-import-not-at-top
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.unlock()
  config.data.data_dir = data_dir
  # The shapes tokenizer from a small corpus: 0.03 s to train instead of 5 s.
  config.data.shapes.train, config.data.shapes.validation, config.data.shapes.test = 96, 8, 8
  config.model.vision.image_size = image_size
  config.model.vision.patch_size = image_size // 4
  config.lock()
  shapes.prepare_assets(config)  # the tokenizer; the TFDS records are not needed
  params = random_params(config, seed)
  gen = generate.Generator(config, params, mesh=mesh)
  return config, inference.TextGenerator(gen, tokenizer_lib.load(config),
                                         config.data.template)


def random_params(config, seed: int = 0) -> dict:
  """Host (numpy) random weights for `config`'s model, without running its init.

  Shapes from `jax.eval_shape` (tracing only); norm scales 1, biases 0, other leaves
  N(0, 0.02) from numpy (the same on every process for one seed). Running `model.init`
  on CPU costs 10-15 s, this well under one. The LM head is scaled so that greedy answers
  differ by question and image and no near-tie can flip between meshes.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvm import models  # pylint: disable=g-import-not-at-top
  h = config.model.vision.image_size
  shapes = nn.unbox(jax.eval_shape(models.build(config).init, jax.random.key(0),
                                   jnp.zeros((1, 1, h, h, 3)), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = np.ones(leaf.shape)
    elif name.endswith("['bias']"):
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0, 0.02 * (50 if "['lm_head']" in name else 1), leaf.shape)
    return value.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes['params'])


def write_pope(folder: str, num_questions: int, image_px: int = 8,
               num_image_files: int = NUM_IMAGE_FILES) -> str:
  """A POPE-layout benchmark (coco_pope_random.json + val2014/) of `num_questions`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(folder, 'val2014'), exist_ok=True)
  for i in range(num_image_files):
    Image.new('RGB', (image_px, image_px + i % 3),
              (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(
                  os.path.join(folder, 'val2014', f'{i}.png'))
  objects = ('dog', 'cat', 'car', 'tree', 'chair', 'cup', 'bird')
  with open(os.path.join(folder, 'coco_pope_random.json'), 'w') as f:
    for q in range(num_questions):
      f.write(json.dumps({'question_id': q, 'image': f'{q % num_image_files}.png',
                          'text': f'Is there a {objects[q % len(objects)]} in the image?',
                          'label': 'yes' if q % 2 else 'no'}) + '\n')
  return folder


class PeakSampler:
  """The peak of the current RSS while the `with` block runs (a 5 ms sampling thread)."""

  def __enter__(self):
    self.start = self.peak = stream.rss_mb()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, stream.rss_mb())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, stream.rss_mb())


def measure(counts, batch_size: int = 64, max_new_tokens: int = 2, workdir: str | None = None,
            num_workers: int = 2, prefetch: int = 4, image_size: int = 32, log=print) -> dict:
  """Runs `lvm.evaluate.run` on generated POPE benchmarks of each size in `counts`.

  Returns:
    {n: {'rss_start_mb', 'rss_peak_mb', 'growth_mb', 'questions_per_second', 'seconds',
    'num_scored', 'num_questions'}}.
  """
  from lvm import evaluate  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    workdir = workdir or tmp
    config, text_gen = tiny_text_generator(os.path.join(workdir, 'tok'),
                                           image_size=image_size)
    run = lambda n, name: evaluate.run(
        text_gen, config, 'pope', write_pope(os.path.join(workdir, name), n),
        os.path.join(workdir, 'out_' + name), batch_size=batch_size,
        max_new_tokens=max_new_tokens, num_workers=num_workers, prefetch=prefetch)
    run(2 * batch_size, 'warmup')  # compile (both the full and the last, short batch)
    results = {}
    for n in counts:
      with PeakSampler() as rss:
        result = run(n, f'n{n}')
      results[n] = {'rss_start_mb': round(rss.start, 1), 'rss_peak_mb': round(rss.peak, 1),
                    'growth_mb': round(rss.peak - rss.start, 1),
                    'questions_per_second': result['questions_per_second'],
                    'seconds': result['seconds'], 'num_scored': result['num_scored'],
                    'num_questions': result['num_questions']}
      log(f'{n:>7} questions: RSS {rss.start:.1f} MiB before, peak {rss.peak:.1f} MiB '
          f'(+{rss.peak - rss.start:.1f} MiB), {result["num_scored"]} of '
          f'{result["num_questions"]} scored, {result["questions_per_second"]:.1f} '
          'questions/s')
  return results


def measure_in_subprocess(counts, malloc_arena_max: int = 0, timeout: float = 900,
                          **kwargs) -> dict:
  """`measure` in a fresh process (its own peak), optionally with glibc's MALLOC_ARENA_MAX.

  glibc gives threads (the prefetch workers, XLA's) malloc arenas of their own that keep
  freed memory, so RSS creeps up by a bounded amount over a process's first runs whatever
  the benchmark's size; MALLOC_ARENA_MAX=2 removes that creep, leaving the harness's own use.
  kwargs: `main`'s flags (batch_size, max_new_tokens, num_workers, prefetch, image_size).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if malloc_arena_max:
    env['MALLOC_ARENA_MAX'] = str(malloc_arena_max)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    flags = [f'--{k}={v}' for k, v in kwargs.items()]
    subprocess.run([sys.executable, os.path.abspath(__file__),
                    f'--counts={",".join(map(str, counts))}', f'--out={out}', *flags],
                   env=env, check=True, timeout=timeout, capture_output=True)
    with open(out) as f:
      return {int(k): v for k, v in json.load(f).items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--counts', default='2000,20000')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--max_new_tokens', type=int, default=2)
  parser.add_argument('--num_workers', type=int, default=2)
  parser.add_argument('--prefetch', type=int, default=4)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  counts = [int(c) for c in args.counts.split(',')]
  results = measure(counts, args.batch_size, args.max_new_tokens,
                    num_workers=args.num_workers, prefetch=args.prefetch,
                    image_size=args.image_size)
  small, large = results[counts[0]], results[counts[-1]]
  print(f'growth {counts[0]} -> {counts[-1]} questions: {small["growth_mb"]:.1f} -> '
        f'{large["growth_mb"]:.1f} MiB; process peak {stream.peak_rss_mb():.1f} MiB; '
        f'a preprocessed-image-per-question harness would hold '
        f'{(counts[-1] - counts[0]) * args.image_size ** 2 * 3 * 4 / 2 ** 20:.1f} MiB more')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({str(k): v for k, v in results.items()}, f, indent=1)


if __name__ == '__main__':
  main()
