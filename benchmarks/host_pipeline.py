r"""Host input pipeline throughput at LLaVA-1.5 settings, per host core, packed and not.

  python -m benchmarks.host_pipeline [--stage=2] [--samples=480] [--images=160]
      [--batch=16] [--batches=12] [--workers=2] [--loader=threads|grain|both] [--work_dir=DIR]

Builds, in a temporary folder (or `--work_dir`, reused when it already holds them):
  * a `llava_json` dataset: `--images` real JPEG files of COCO-like sizes (640x480, 640x427,
    portrait, VG's 500x375 and 800x600, a few larger) with photo-like texture (1/f noise and
    grain, quality 90), and `--samples` conversations drawn from the LLaVA-665K mixture
    (stage 2: `MIX_665K`, sources and counts from the LLaVA-1.5 paper's data table; the
    per-source turn counts and word lengths are this script's assumptions, see `MIX_665K`)
    or LCS-558K-like captions (stage 1);
  * a 32,000-piece BPE tokenizer (`tokenizers`, LLaMA-like: Metaspace, single digits)
    trained on text from the same generator.
Then runs lvm's own pipeline (`lvm.data.pipeline`, the `configs/llava15.py` config of that
stage: 336 px CLIP-L input, stage 2 `pad` + `vicuna_v1`, stage 1 `resize` + `plain`,
seq_len 2048) over it, unpacked and packed, and reports per layout:
  * samples per CPU-second = samples / CPU seconds of this process (all its threads,
    `time.process_time`) = samples/s per fully used host core. This is the figure that stays
    honest on a machine shared with other jobs; it is measured with the rows preprocessed
    in the calling thread (`data.num_workers=0`);
  * wall-clock samples/s with `--workers` threads (`data.num_workers`), which on a shared
    machine measures the contention as much as the code; with `--loader=grain` (or `both`),
    also with `--workers` grain worker processes (`data.loader='grain'`, the same batches;
    their CPU time is in the workers, so only the wall figure compares);
  * token padding fraction, empty image slots, samples per row;
  * where one sample's CPU time goes (JPEG decode, pad, resize, crop + normalize, template +
    tokenize, read), timed stage by stage with `time.thread_time`, the rest (row assembly,
    packing, stacking) as the difference;
  * how many host cores one H100 needs: the samples/s one H100 trains on at the training
    speed measured in docs/performance.md (run 22), divided by the samples/s per core.
Only host work is timed: records read from the prepared array_record files, decoded,
preprocessed and stacked into numpy batches (`DataIterator.next_local`); not the transfer to
devices.
"""

import argparse
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Image sizes (width, height) and weights: COCO (the bulk of LLaVA-665K's images: 640 on the
# long side), Visual Genome (500x375 .. 800x600), larger TextCaps/OpenImages photos, small
# OCR-VQA book covers.
IMAGE_SIZES = (((640, 480), 8), ((640, 427), 4), ((480, 640), 3), ((427, 640), 2),
               ((640, 640), 1), ((500, 375), 3), ((800, 600), 2), ((1024, 768), 1),
               ((300, 450), 2))

# LLaVA-665K (llava_v1_5_mix665k.json): source, samples (thousands; LLaVA-1.5 paper, data
# mixture table), has an image, turns per sample (min, max; uniform), words of a question
# and of an answer (median, lognormal sigma), and the prompt appended to each question.
# The turn counts and lengths are assumptions from how each source is built (VQAv2, GQA,
# OCR-VQA, RefCOCO and VG group several questions on one image into one conversation;
# ShareGPT is long text-only chat), not published statistics.
SHORT = 'Answer the question using a single word or phrase.'
MIX_665K = (
    ('llava_conv', 58, True, (1, 8), (12, .4), (60, .5), ''),
    ('llava_detail', 23, True, (1, 1), (9, .2), (110, .3), ''),
    ('llava_complex', 77, True, (1, 1), (15, .4), (110, .4), ''),
    ('sharegpt', 40, False, (1, 6), (60, 1.), (180, .8), ''),
    ('vqav2', 83, True, (1, 10), (7, .3), (1, .4), SHORT),
    ('gqa', 72, True, (1, 20), (10, .3), (1, .4), SHORT),
    ('okvqa', 9, True, (1, 1), (9, .3), (1, .4), SHORT),
    ('ocrvqa', 80, True, (1, 10), (6, .3), (3, .6), SHORT),
    ('aokvqa', 66, True, (1, 1), (30, .3), (1, 0.),
     "Answer with the option's letter from the given choices directly."),
    ('textcaps', 22, True, (1, 1), (0, 0.), (12, .3),
     'Provide a one-sentence caption for the provided image.'),
    ('refcoco', 48, True, (1, 12), (3, .3), (6, .4), 'BOX'),
    ('vg', 86, True, (1, 12), (3, .3), (6, .4), 'BOX'),
)
# LCS-558K: one image, a short instruction (dropped by the `plain` template), a BLIP caption.
CAPTION_WORDS = (10, .35)

# The training speed one H100 was measured at (docs/performance.md, run 22, `gpu_suite
# --only=train_2b`): the 2.4 B LLaVA-1.5-shaped model (CLIP-L 336, LLaMA decoder trained in
# full), 10 rows x 2048 tokens of one image each in 498.0 ms = 528.7 TFLOP/s of model FLOPs.
H100_STEP_S, H100_ROWS = 0.498, 10

_SYLLABLES = [c + v for c in 'bcdfghjklmnprstvwz' for v in 'aeiou'] + ['th', 'st', 'ng']


def photo(rng, w, h) -> Image.Image:
  """A photo-like RGB image: octaves of smooth noise (stronger at coarse scales) + grain."""
  acc = np.full((h, w, 3), 128, np.float32)
  for octave, amp in ((64, 50), (16, 30), (4, 22), (2, 12)):
    small = rng.normal(0, 1, (h // octave + 2, w // octave + 2, 3)).astype(np.float32)
    acc += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize(
        (w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1)
  acc += rng.normal(0, 8, (h, w, 3)).astype(np.float32)
  return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


class Words:
  """Zipf-distributed words of a synthetic lexicon (English-like piece statistics for BPE)."""

  def __init__(self, rng, size=40000):
    self.rng = rng
    lengths = rng.choice([1, 2, 2, 3, 3, 3, 4], size)
    self.lexicon = [''.join(rng.choice(_SYLLABLES, n)) for n in lengths]
    p = 1.0 / np.arange(1, size + 1)
    self.p = p / p.sum()

  def text(self, n: int) -> str:
    words = [self.lexicon[i] for i in self.rng.choice(len(self.lexicon), max(n, 1), p=self.p)]
    return ' '.join(words).capitalize() + '.'

  def box(self) -> str:
    return '[' + ', '.join(f'{x:.2f}' for x in np.sort(self.rng.random(4))) + ']'

  def length(self, median, sigma) -> int:
    return max(1, int(round(median * np.exp(sigma * self.rng.normal())))) if median else 0


def conversation(words, source, rng):
  """(conversations, has image) of one sample of `source` (a `MIX_665K` row)."""
  _, _, image, (lo, hi), question, answer, prompt = source
  turns = []
  for t in range(int(rng.integers(lo, hi + 1))):
    q = words.text(words.length(*question)) if question[0] else ''
    if prompt == 'BOX':  # region description / grounding with coordinates
      q = f'Please provide a short description for this region: {words.box()}. {q}'
    elif prompt:
      q = f'{q}\n{prompt}'.strip()
    if image and t == 0:
      q = f'<image>\n{q}'
    turns += [{'from': 'human', 'value': q},
              {'from': 'gpt', 'value': words.text(words.length(*answer))}]
  return turns, image


def manual_dir(root, stage):
  return os.path.join(root, f'manual_stage{stage}')


def make_dataset(root, stage, samples, images, seed=0):
  """Writes `manual_dir(root, stage)` (mix.json + images/*.jpg); returns the mean JPEG bytes."""
  rng = np.random.default_rng(seed)
  manual = manual_dir(root, stage)
  os.makedirs(os.path.join(manual, 'images'), exist_ok=True)
  sizes, weights = zip(*IMAGE_SIZES)
  total = 0
  for i in range(images):
    w, h = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
    path = os.path.join(manual, 'images', f'{i:06d}.jpg')
    photo(rng, w, h).save(path, format='JPEG', quality=90)
    total += os.path.getsize(path)
  words = Words(rng)
  counts = np.array([s[1] for s in MIX_665K], np.float64)
  entries = []
  for i in range(samples):
    if stage == 1:
      turns = [{'from': 'human', 'value': '<image>\nRender a clear and concise summary of '
                                          'the photo.'},
               {'from': 'gpt', 'value': words.text(words.length(*CAPTION_WORDS))}]
      has_image = True
    else:
      turns, has_image = conversation(words, MIX_665K[rng.choice(len(MIX_665K),
                                                                 p=counts / counts.sum())], rng)
    entry = {'id': f's{i:07d}', 'conversations': turns}
    if has_image:
      entry['image'] = f'{int(rng.integers(images)):06d}.jpg'
    entries.append(entry)
  with open(os.path.join(manual, 'mix.json'), 'w') as f:
    json.dump(entries, f)
  return total / max(images, 1)


def make_tokenizer(root, vocab_size=32000, corpus_words=400_000, seed=1):
  """Trains a LLaMA-like BPE (`tokenizer.json` + `tokenizer_config.json`); returns its path."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  # pylint: enable=g-import-not-at-top
  path = os.path.join(root, 'tokenizer', 'tokenizer.json')
  if os.path.exists(path):
    return path
  words = Words(np.random.default_rng(seed))
  # The same generator as the conversations (same lexicon: `Words` draws it first).
  corpus = [words.text(50) for _ in range(corpus_words // 50)]
  corpus += [f'{words.box()} USER: ASSISTANT: <image>\n{SHORT} ' + MIX_665K[8][6]] * 50
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
  tok.decoder = decoders.Metaspace()
  alphabet = sorted(set(''.join(corpus)) | set('0123456789.,:[]\'?'))
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<unk>', '<s>', '</s>'], initial_alphabet=alphabet,
      show_progress=False))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(path)
  with open(os.path.join(os.path.dirname(path), 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>'}, f)
  return path


def make_config(root, stage, tokenizer, packing, batch, workers, loader='threads'):
  """configs/llava15.py of the stage over the generated data, sized for the host only."""
  from configs import llava15  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = llava15.get_config(f'size=7b,stage={"pretrain" if stage == 1 else "finetune"},'
                              f'packing={int(packing)}')
  config.data.manual_dir = manual_dir(root, stage)
  config.data.data_dir = os.path.join(root, 'tfds')
  config.data.llava_json.validation_fraction = 0.0
  config.data.tokenizer = tokenizer
  vocab = tokenizer_lib.Tokenizer(tokenizer, 1 << 30, 1 << 30).vocab_size
  config.model.image_token_id, config.model.pad_token_id = vocab, vocab + 1
  config.train.batch_size = batch
  config.data.num_workers = workers
  config.data.loader = loader
  config.data.prefetch = 0
  return config


class Counter:
  """Samples, padding and empty image slots of the batches it is shown (not kept: a training
  loop drops each batch after its step, and holding them all would time the kernel faulting
  in fresh memory for every batch instead of the pipeline)."""

  def __init__(self):
    self.samples = self.rows = self.real = self.total = self.slots = self.used = 0
    self.image_slots = 0

  def add(self, b):
    if 'segment_ids' in b:
      self.samples += int(b['segment_ids'].max(axis=1).sum())
    else:
      self.samples += int(b['attention_mask'].any(axis=1).sum())
    self.rows += len(b['input_ids'])
    self.real += int(b['attention_mask'].sum())
    self.total += b['attention_mask'].size
    im = b['images'].reshape(*b['images'].shape[:2], -1)
    self.image_slots = im.shape[1]
    self.slots += im.shape[0] * im.shape[1]
    self.used += int((im != 0).any(-1).sum())


def time_pipeline(config, batches):
  """Runs `batches` host batches after one warm-up; returns counts and timings."""
  from lvm import sharding  # pylint: disable=g-import-not-at-top
  from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh))
  n = Counter()
  try:
    it.next_local()  # warm-up: thread pool or worker processes, tokenizer, first reads
    wall, cpu = time.perf_counter(), time.process_time()
    sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    counting_wall = counting_cpu = 0.0  # the counting is not the pipeline's: left out
    for _ in range(batches):
      batch = it.next_local()
      w, c = time.perf_counter(), time.process_time()
      n.add(batch)
      counting_wall += time.perf_counter() - w
      counting_cpu += time.process_time() - c
      del batch
    wall = time.perf_counter() - wall - counting_wall
    cpu = time.process_time() - cpu - counting_cpu
    sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0  # kernel: page faults
    stats = it.stats
  finally:
    it.close()
  return {'samples': n.samples, 'rows': n.rows, 'wall_s': wall, 'cpu_s': cpu, 'sys_s': sys_s,
          'pad': 1 - n.real / n.total, 'empty_slots': 1 - n.used / n.slots,
          'samples_per_row': n.samples / n.rows, 'drops': stats,
          'samples_per_cpu_s': n.samples / cpu, 'samples_per_s': n.samples / wall,
          'image_slots': n.image_slots}


def breakdown(config, n):
  """CPU seconds per sample of each host stage over `n` records (`time.thread_time`)."""
  from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  source = pipeline.data_source(config, 'train')
  proc = pipeline.Processor(config, tokenizer_lib.load(config), train=True)
  t = dict.fromkeys(('read', 'template_tokenize', 'jpeg_decode', 'pad', 'resize',
                     'crop_normalize'), 0.0)
  clock = time.thread_time
  n = min(n, len(source))
  for i in range(n):
    c0 = clock()
    record = source[i]
    c1 = clock()
    try:
      _, _, encoded = proc.text(record)
    except Exception:  # pylint: disable=broad-except
      encoded = []  # dropped by the pipeline too (counted there)
    c2 = clock()
    t['read'] += c1 - c0
    t['template_tokenize'] += c2 - c1
    for data in encoded:
      c0 = clock()
      im, _ = images_lib.decode(data)
      c1 = clock()
      if proc.aspect == 'pad':
        im = images_lib.expand2square(im, images_lib.mean_colour(proc.mean))
      c2 = clock()
      a = np.asarray(images_lib.resize_shortest(im, proc.size))
      c3 = clock()
      a = images_lib.center_crop(a, proc.size)
      scale = np.float32(1 / 255) / np.asarray(proc.std, np.float32)
      out = np.multiply(a, scale, dtype=np.float32)
      out -= np.asarray(proc.mean, np.float32) / np.asarray(proc.std, np.float32)
      c4 = clock()  # the steps of images.preprocess, one by one
      t['jpeg_decode'] += c1 - c0
      t['pad'] += c2 - c1
      t['resize'] += c3 - c2
      t['crop_normalize'] += c4 - c3
  return {k: v / n for k, v in t.items()}


@functools.lru_cache
def _row_flops(size, stage):
  """(decoder, per image) model FLOPs of one 2048-token row (`lvm.flops`)."""
  from benchmarks.configs import gpu_llava15  # pylint: disable=g-import-not-at-top
  from lvm import flops  # pylint: disable=g-import-not-at-top
  c = gpu_llava15.get_config(f'size={size},attention=xla')  # counts only, no cuDNN here
  c.train.stage = 'pretrain' if stage == 1 else 'finetune'
  c.data.max_images = 1
  parts = flops.model_flops(c, 1, 2048)['parts']
  return parts['decoder'], parts['vision'] + parts['projector']


def h100_rows_per_s(size, stage, images_per_row):
  """(rows of 2048 tokens one H100 trains per second, model FLOP/s): run 22's measured
  model-FLOP rate divided by one row's FLOPs for the model size, stage and image slots of
  a row (the tower runs on every slot). Exact for run 22's own shape (size=2b, stage 2, one
  image per row); any other shape assumes the same FLOP rate."""
  decoder, image = _row_flops('2b', 2)
  rate = H100_ROWS * (decoder + image) / H100_STEP_S
  decoder, image = _row_flops(size, stage)
  return rate / (decoder + images_per_row * image), rate


def run(args) -> dict:
  """Generates the data (unless present), times both layouts; returns the measurements."""
  root = args.work_dir or tempfile.mkdtemp(prefix='host_pipeline_')
  try:
    manual = manual_dir(root, args.stage)
    if not os.path.exists(os.path.join(manual, 'mix.json')):
      make_dataset(root, args.stage, args.samples, args.images)
    jpeg_bytes = np.mean([os.path.getsize(os.path.join(manual, 'images', f))
                          for f in os.listdir(os.path.join(manual, 'images'))])
    tok = make_tokenizer(root, args.vocab_size, args.corpus_words)
    from lvm import data  # pylint: disable=g-import-not-at-top
    results = {'jpeg_kib': jpeg_bytes / 1024, 'work_dir': root}
    data.prepare(make_config(root, args.stage, tok, False, args.batch, 0))
    for packing in (False, True):
      name = 'packed' if packing else 'unpacked'
      serial = time_pipeline(make_config(root, args.stage, tok, packing, args.batch, 0),
                             args.batches)
      results[name] = dict(serial)
      if args.loader in ('threads', 'both'):
        results[name]['threaded'] = time_pipeline(make_config(
            root, args.stage, tok, packing, args.batch, args.workers), args.batches)
      if args.loader in ('grain', 'both'):
        results[name]['grain'] = time_pipeline(make_config(
            root, args.stage, tok, packing, args.batch, args.workers, 'grain'), args.batches)
    config = make_config(root, args.stage, tok, False, args.batch, 0)
    results['aspect'], results['template'] = config.data.image_aspect, config.data.template
    from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tokenizer = tokenizer_lib.load(config)
    results['vocab_size'] = tokenizer.vocab_size
    results['text_tokens'] = text_lengths(config, tokenizer)
    results['stages'] = breakdown(config, args.breakdown)
    for name in ('unpacked', 'packed'):
      r = results[name]
      rows_s, rate = h100_rows_per_s(args.size, args.stage, r['image_slots'])
      r['h100_samples_per_s'] = rows_s * r['samples_per_row']
      r['cores_per_h100'] = r['h100_samples_per_s'] / r['samples_per_cpu_s']
      results['h100_model_flops_per_s'] = rate
    return results
  finally:
    if not args.work_dir and not args.keep:
      shutil.rmtree(root, ignore_errors=True)


def text_lengths(config, tokenizer):
  """Percentiles of the samples' token counts (template + text + 576 image tokens)."""
  from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.data_source(config, 'train')
  proc = pipeline.Processor(config, tokenizer, train=True)
  lengths = []
  for i in range(len(source)):
    try:
      lengths.append(len(proc.text(source[i])[0]))
    except Exception:  # pylint: disable=broad-except
      pass
  a = np.asarray(lengths)
  return {'mean': float(a.mean()), 'p10': float(np.percentile(a, 10)),
          'p50': float(np.percentile(a, 50)), 'p90': float(np.percentile(a, 90)),
          'max': int(a.max()), 'n': len(a)}


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--stage', type=int, choices=(1, 2), default=2,
                 help='1: LCS-558K-like captions, resize, plain; 2: LLaVA-665K-like, pad, '
                      'vicuna_v1')
  p.add_argument('--samples', type=int, default=480, help='conversations generated')
  p.add_argument('--images', type=int, default=160, help='JPEG files generated')
  p.add_argument('--batch', type=int, default=16, help='rows per host batch')
  p.add_argument('--batches', type=int, default=12, help='timed batches per layout')
  p.add_argument('--workers', type=int, default=2, help='data.num_workers of the wall run')
  p.add_argument('--loader', choices=('threads', 'grain', 'both'), default='threads',
                 help='data.loader of the wall run(s): worker threads, grain worker processes')
  p.add_argument('--breakdown', type=int, default=120, help='records timed stage by stage')
  p.add_argument('--vocab_size', type=int, default=32000)
  p.add_argument('--corpus_words', type=int, default=400_000, help='tokenizer training text')
  p.add_argument('--size', default='7b', help='gpu_llava15 model size the H100 rate is '
                 'scaled to (2b = the measured model itself)')
  p.add_argument('--work_dir', default='', help='keep and reuse the data here')
  p.add_argument('--keep', action='store_true', help='keep the temporary folder')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  r = run(args)
  if args.json:
    print(json.dumps(r, default=str))
    return 0
  t = r['text_tokens']
  print(f'stage {args.stage}: {args.samples} samples, {args.images} JPEGs (mean '
        f'{r["jpeg_kib"]:.0f} KiB), 336 px, {r["aspect"]}, {r["template"]}, seq_len 2048, BPE '
        f'vocab {r["vocab_size"]}; tokens per sample (576 visual included) mean '
        f'{t["mean"]:.0f}, p10 {t["p10"]:.0f}, p50 {t["p50"]:.0f}, p90 {t["p90"]:.0f}, max '
        f'{t["max"]}')
  print(f'{args.batches} batches x {args.batch} rows per layout after one warm-up batch')
  print('layout    samples/row  pad_tokens  empty_slots  CPU ms/sample (kernel)  samples/CPU-s '
        f' wall samples/s ({args.workers} workers)  H100 samples/s  cores/H100')
  for name in ('unpacked', 'packed'):
    x = r[name]
    print(f'{name:9s} {x["samples_per_row"]:11.2f}  {x["pad"]:10.1%}  {x["empty_slots"]:11.1%}'
          f'  {1e3 * x["cpu_s"] / x["samples"]:13.1f} ({1e3 * x["sys_s"] / x["samples"]:4.1f})'
          f'  {x["samples_per_cpu_s"]:13.1f}  '
          f'{x["threaded"]["samples_per_s"] if "threaded" in x else float("nan"):28.1f}  '
          f'{x["h100_samples_per_s"]:14.1f}  '
          f'{x["cores_per_h100"]:10.2f}')
  for name in ('unpacked', 'packed'):
    if 'grain' in r[name]:
      print(f'{name}: wall samples/s with {args.workers} grain worker processes '
            f'(data.loader=grain): {r[name]["grain"]["samples_per_s"]:.1f}')
  print('samples/CPU-s = samples / process CPU seconds (all threads, num_workers=0) = samples/s'
        ' per fully used core')
  print(f'H100 samples/s = rows/s x samples/row; rows/s = {r["h100_model_flops_per_s"] / 1e12:.1f}'
        f' TFLOP/s (run 22: {H100_ROWS} x 2048-token rows of the 2.4 B model in '
        f'{H100_STEP_S * 1e3:.1f} ms) / model FLOPs of one row of {args.size} (lvm.flops, with'
        ' the row\'s image slots); cores/H100 = H100 samples/s / samples/CPU-s')
  s = r['stages']
  total = sum(s.values())
  per = 1e3 * r['unpacked']['cpu_s'] / r['unpacked']['samples']
  print('CPU ms per sample by stage: ' + ', '.join(f'{k} {1e3 * v:.2f}' for k, v in s.items())
        + f'; sum {1e3 * total:.2f}; rest of the unpacked pipeline (row assembly, stacking) '
        f'{per - 1e3 * total:.2f}')
  drops = {n: r[n]['drops'] for n in ('unpacked', 'packed') if r[n]['drops']}
  if drops:
    print(f'dropped (counted by the pipeline): {drops}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
