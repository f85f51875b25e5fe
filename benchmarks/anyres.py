"""Anyres generation: tiles padded to the maximum vs bucketed with the tower on real tiles only.

A model with random weights, CLIP tiles of --tile_size px and a LLaMA decoder, on the grids
of `--family`: `next`, llava-v1.6's five (1x2, 2x1, 2x2, 3x1, 1x3; T = 5), or `onevision`,
1x1 .. 6x6 with `anyres_max_9` (T = 37), each scaled from its 336 / 384 px tiles to
--tile_size. Questions ask about images of a mix of aspect ratios (`MIX`, sizes scaled the
same way, so each picks the grid it would pick at full size), one image per question. Each
mode answers every question in batches (greedy, --new_tokens each): a first pass compiles,
then the best of --repeats passes is timed. Prints per mode the generated tokens/s of that
pass, the seconds of the first pass, the number of compiled shapes
(`Generator.num_compiles`) and the tiles through the tower (real tiles vs tower slots);
checks that both modes generate the same tokens. One device.

  python benchmarks/anyres.py --family=next          # the CPU settings of docs/performance.md
  python benchmarks/anyres.py --family=onevision
  python benchmarks/anyres.py --questions=2 --batch=2 --new_tokens=2 --depth=1   # seconds
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from lvm.data.anyres import onevision_pinpoints  # pylint: disable=g-import-not-at-top

# An assumed mix of image shapes, (width, height) at full scale, and weights:
# COCO-like photos (4:3 landscape and portrait), 16:9 frames, squares, letter-size documents,
# 3:1 charts and small images.
MIX = (((640, 480), 0.45), ((480, 640), 0.15), ((1280, 720), 0.10), ((512, 512), 0.10),
       ((850, 1100), 0.10), ((1200, 400), 0.05), ((200, 150), 0.05))
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def make_config(args):
  from lvm import config as lvm_config  # pylint: disable=g-import-not-at-top
  config = lvm_config.get_config()
  config.model.vision = lvm_config.vision_config(
      'clip', image_size=args.tile_size, patch_size=args.patch_size, width=args.vision_width,
      depth=args.vision_depth, heads=4, mlp_dim=4 * args.vision_width)
  config.model.projector = lvm_config.projector_config('mlp2x_gelu')
  config.model.decoder = lvm_config.decoder_config(
      vocab_size=512, width=args.width, depth=args.depth, heads=4, kv_heads=2,
      mlp_dim=4 * args.width)
  if args.family == 'next':
    config.model.anyres.pinpoints = [[h * args.tile_size // 336, w * args.tile_size // 336]
                                     for h, w in NEXT_PINPOINTS]
  else:
    config.model.anyres.pinpoints = [list(p) for p in onevision_pinpoints(args.tile_size, 6)]
    config.model.anyres.vision_aspect_ratio = 'anyres_max_9'
  config.model.image_token_id, config.model.pad_token_id = 510, 511
  config.model.dtype = 'float32'
  return config


def questions(args, config):
  """(prompt ids, [AnyresImage]) per question, image shapes drawn from MIX."""
  from lvm import anyres_inputs  # pylint: disable=g-import-not-at-top
  from lvm import inference  # pylint: disable=g-import-not-at-top
  from lvm import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  shapes, weights = zip(*MIX)
  out = []
  for k in rng.choice(len(shapes), size=args.questions, p=np.asarray(weights) / sum(weights)):
    full = 336 if args.family == 'next' else 384
    w, h = (max(1, s * args.tile_size // full) for s in shapes[k])
    image = inference.load_image(config, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    ids = [1, config.model.image_token_id] + rng.integers(3, 500, 8).tolist()
    count = models.num_image_tokens(config, image_size=image.size)
    out.append((anyres_inputs.expand_image_tokens(ids, [count], config.model.image_token_id),
                [image]))
  return out


def run(args) -> dict:
  """Both modes on the same questions; returns {mode: measurements}."""
  import jax  # pylint: disable=g-import-not-at-top
  from lvm import anyres_inputs  # pylint: disable=g-import-not-at-top
  from lvm import models  # pylint: disable=g-import-not-at-top
  from lvm.generate import Generator  # pylint: disable=g-import-not-at-top
  from lvm.models import anyres_model  # pylint: disable=g-import-not-at-top
  from lvm import sharding  # pylint: disable=g-import-not-at-top
  config = make_config(args)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])  # one device, as a single chip
  images, ids, kw = models.example_inputs(config)
  params = jax.jit(lambda k: models.random_params(config.model, k, images, ids, **kw))(
      jax.random.key(args.seed))
  params['decoder']['lm_head']['kernel'] = params['decoder']['lm_head']['kernel'] * 50
  qs = questions(args, config)
  batches = [qs[i:i + args.batch] for i in range(0, len(qs), args.batch)]
  layout, t = anyres_model.layout(config.model), anyres_model.num_tiles(config.model)
  results, tokens = {}, {}
  for mode in ('padded', 'bucketed'):
    gen = Generator(config, params, mesh=mesh, bucket_tiles=mode == 'bucketed')

    def one_pass():
      outs = []
      for batch in batches:
        outs += gen.generate([p for p, _ in batch], [im for _, im in batch],
                             max_new_tokens=args.new_tokens, min_batch=args.batch)
      return outs

    start = time.perf_counter()
    one_pass()
    first = time.perf_counter() - start
    timed = float('inf')
    for _ in range(args.repeats):
      start = time.perf_counter()
      outs = one_pass()
      timed = min(timed, time.perf_counter() - start)
    tokens[mode] = [o.tokens for o in outs]
    real = slots = 0
    for batch in batches:
      rows = [im for _, im in batch]
      real += sum(im[0].tiles.shape[0] for im in rows)
      arr, _, budget = anyres_inputs.tile_batch(rows, len(rows), args.batch, layout, t,
                                                mode == 'bucketed')
      slots += budget or int(np.prod(arr.shape[:3]))
    generated = sum(len(o.tokens) for o in outs)
    results[mode] = {'tokens_per_s': round(generated / timed, 1),
                     'questions_per_s': round(len(qs) / timed, 2),
                     'first_pass_s': round(first, 2), 'timed_pass_s': round(timed, 3),
                     'compiled_shapes': gen.num_compiles, 'real_tiles': real,
                     'tower_tiles': slots}
  results['same_tokens'] = tokens['padded'] == tokens['bucketed']
  return results


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--family', choices=('next', 'onevision'), default='next')
  p.add_argument('--tile_size', type=int, default=64)
  p.add_argument('--patch_size', type=int, default=8)
  p.add_argument('--vision_width', type=int, default=128)
  p.add_argument('--vision_depth', type=int, default=4)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--questions', type=int, default=64)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--new_tokens', type=int, default=16)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--repeats', type=int, default=2, help='timed passes; the best counts')
  p.add_argument('--out', default='', help='write the results as JSON here')
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  results = run(args)
  print(f'{"mode":9} {"tokens/s":>9} {"questions/s":>11} {"1st pass s":>10} '
        f'{"compiled shapes":>15} {"real tiles":>10} {"tower tiles":>11}')
  for mode in ('padded', 'bucketed'):
    r = results[mode]
    print(f'{mode:9} {r["tokens_per_s"]:9.1f} {r["questions_per_s"]:11.2f} '
          f'{r["first_pass_s"]:10.1f} {r["compiled_shapes"]:15d} {r["real_tiles"]:10d} '
          f'{r["tower_tiles"]:11d}')
  print(f'same greedy tokens in both modes: {results["same_tokens"]}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  return 0 if results['same_tokens'] else 1


if __name__ == '__main__':
  sys.exit(main())
