"""`lvm.evaluate` of an anyres (LLaVA-NeXT-style) run, end to end on a tiny local benchmark.

A tiny anyres config (CLIP 32 px tiles on 1x2, 2x1 and 2x2 grids) with random weights is saved
as a run, loaded with `lvm.inference.from_run` and scored on a POPE-layout benchmark whose
images have different aspect ratios (one missing). Greedy tokens equal to transformers' are
checked in tests/hf/test_hf_anyres_generate.py; this test covers the harness, the run's
checkpoint and the image loading.
"""

import json

import jax
import numpy as np
from PIL import Image

from configs import tiny
from lvm import anyres_inputs
from lvm import checkpoint
from lvm import evaluate
from lvm import inference
from lvm import models
from lvm import sharding

SIZES = {1: (40, 20), 2: (20, 60), 3: (50, 50)}  # question id -> image (width, height)


def test_pope_with_an_anyres_run(tmp_path):
  config = tiny.get_config('seq_len=256')
  config.model.anyres.pinpoints = [[32, 64], [64, 32], [64, 64]]
  config.data.data_dir = str(tmp_path / 'data')
  config.data.shapes.image_size = 32
  config.data.shapes.train, config.data.shapes.validation, config.data.shapes.test = 96, 8, 8
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.prepare_assets(config)  # the run's tokenizer
  images, ids, kw = models.example_inputs(config)
  params = jax.jit(lambda k: models.random_params(config.model, k, images, ids, **kw))(
      jax.random.key(0))
  params['decoder']['lm_head']['kernel'] = params['decoder']['lm_head']['kernel'] * 50
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), config.checkpoint)
  ckpt.save(1, {'params': params}, {}, config)
  ckpt.wait()
  ckpt.close()

  data = tmp_path / 'pope'
  (data / 'val2014').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i, (w, h) in SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        data / 'val2014' / f'{i}.png')
  (data / 'coco_pope_random.json').write_text(''.join(
      json.dumps({'question_id': i, 'image': f'{i}.png', 'text': f'Is there a thing {i}?',
                  'label': 'yes'}) + '\n' for i in (1, 2, 3, 4)))  # 4.png is missing

  # One device (the 8-device path: tests/hf/test_hf_anyres_generate.py).
  one_device = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run_config, gen, text_gen = inference.from_run(str(tmp_path / 'run'), mesh=one_device,
                                                 log=lambda _: None)
  assert gen.anyres is not None
  result = evaluate.run(text_gen, run_config, 'pope', str(data), str(tmp_path / 'out'),
                        batch_size=4, max_new_tokens=3)
  assert result['num_answered'] == 3 and result['skipped'] == {'missing_image': 1}
  assert 'accuracy' in result['scores']['random']
  assert gen.num_compiles == 1  # one batch
  answers = [json.loads(l) for l in (tmp_path / 'out' / 'answers.jsonl').read_text().splitlines()]
  assert [a['question_id'] for a in answers] == ['random/1', 'random/2', 'random/3']
  image = inference.load_image(run_config, str(data / 'val2014' / '1.png'))
  assert isinstance(image, anyres_inputs.AnyresImage) and image.size == (20, 40)


def test_shapes_benchmark_draws_each_scene_at_its_aspect_ratio():
  """The `shapes` benchmark's test images have the shapes the dataset gives them (anyres runs
  train on scenes from 1/3 to 3), not the square `image_size`."""
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  from lvm.eval import shapes as shapes_benchmark  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.shapes.max_aspect = 3
  config.data.shapes.test = 12
  s = shapes.settings(config)
  want = {f'{key}/0': tuple(ex['shape']) for key, ex in shapes.examples(s, config.data.test_split)}
  got = {e.question_id: (e.image.height, e.image.width)
         for e in shapes_benchmark.load('', config) if e.question_id.endswith('/0')}
  assert got == want and len(set(got.values())) > 1
