"""Anyres training data (lvm/data/pipeline.py): tiles, image_sizes and image-token counts
per image for mixed aspect ratios; tile buckets against padding to the maximum; bad images,
samples and configs counted or refused; an anyres config that learns."""

import io
import json

from flax import traverse_util
import jax
import numpy as np
from PIL import Image
import pytest

from configs import shapes as shapes_config
from configs import tiny
from lvm import losses
from lvm import models
from lvm import sharding
from lvm import train
from lvm import validate
from lvm.data import anyres
from lvm.data import pipeline
from lvm.data import tokenizer as tokenizer_lib

from conftest import sp_tokenizer  # pylint: disable=import-error

# LLaVA-NeXT's grids scaled from 336 to the tiny tower's 32 px tiles: 1x2, 2x1, 2x2, 1x3, 3x1.
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def anyres_config(tmp_path, tiles='bucket', seq_len=160):
  config = tiny.get_config(f'seq_len={seq_len}')  # 32 px tiles of 8 px patches: 4x4 features
  config.model.anyres.pinpoints = PINPOINTS
  config.data.anyres_tiles = tiles
  config.data.tokenizer = sp_tokenizer(tmp_path)
  config.data.prefetch = 0
  config.data.system_prompt = ''
  return config


def png(h, w, seed=0) -> bytes:
  a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a, 'RGB').save(buf, format='PNG')
  return buf.getvalue()


def record(images, before=''):
  """A record of `images` asked about in one turn, after a text-only turn `before` if given."""
  turns = [{'from': 'human', 'value': '<image>' * len(images) + '\nWhat color is the circle?'},
           {'from': 'gpt', 'value': 'red'}]
  if before:
    turns = [{'from': 'human', 'value': before}, {'from': 'gpt', 'value': 'blue'}] + turns
  return {'id': 'r', 'images': list(images), 'conversations': json.dumps(turns), 'caption': b''}


def iterate(config, records):
  mesh = sharding.make_mesh(config.mesh)
  tok = tokenizer_lib.load(config)
  return pipeline.DataIterator(config, 'train', mesh, shuffle=False, num_epochs=1,
                               source=records, tokenizer=tok)


# (height, width): square, wide, tall, 1x1, a panorama (1x3 grid), extreme thin but usable.
MIXED = [(64, 64), (30, 64), (64, 25), (1, 1), (100, 300), (20, 200), (50, 40), (33, 97)]


def test_tiles_sizes_and_token_counts_for_mixed_aspect_ratios(tmp_path):
  config = anyres_config(tmp_path)
  it = iterate(config, [record([png(h, w, i)]) for i, (h, w) in enumerate(MIXED)])
  batch = jax.device_get(next(it))
  lay = it.processor.layout
  assert pipeline.tile_buckets(config) == [1, 2, 4, 5]
  assert batch['images'].shape == (8, 1, 5, 32, 32, 3)  # a 2x2 image: the largest bucket
  np.testing.assert_array_equal(batch['image_sizes'][:, 0], MIXED)
  for row, (h, w) in enumerate(MIXED):
    im = Image.open(io.BytesIO(png(h, w, row)))
    want = anyres.tiles(im, PINPOINTS, 32, config.data.image_mean, config.data.image_std)
    t = want.shape[0]
    assert t == pipeline.tiles_needed((h, w), lay)
    np.testing.assert_array_equal(batch['images'][row, 0, :t], want)
    assert not batch['images'][row, 0, t:].any()  # unused tiles are zero
    count = models.num_image_tokens(config, image_size=(h, w))
    ids = batch['input_ids'][row]
    assert int(np.sum(ids == config.model.image_token_id)) == count
    # One contiguous run: the image's tokens are never split or cut.
    run = np.flatnonzero(ids == config.model.image_token_id)
    assert run[-1] - run[0] + 1 == count
  assert [pipeline.tiles_needed(s, lay) for s in MIXED] == [5, 3, 3, 3, 4, 4, 5, 4]
  assert it.batch_shapes == [(8, 1, 5, 32, 32, 3)] and it.stats == {}


def test_bucketing_and_padding_give_the_same_loss(tmp_path):
  # Only 1x2, 2x1 and 1x3 grids: 4 tiles at most, so the bucket is 4 against the maximum 5.
  sizes = [(30, 64), (64, 25), (1, 1), (100, 300), (20, 200), (33, 97), (64, 30), (40, 90)]
  records = [record([png(h, w, i)]) for i, (h, w) in enumerate(sizes)]
  batches = {}
  for tiles in ('bucket', 'max'):
    config = anyres_config(tmp_path, tiles)
    it = iterate(config, records)
    batches[tiles] = next(it)
    assert it.batch_shapes == [(8, 1, 4 if tiles == 'bucket' else 5, 32, 32, 3)]
  bucket, padded = (jax.device_get(batches[k]) for k in ('bucket', 'max'))
  np.testing.assert_array_equal(bucket['images'], padded['images'][:, :, :4])
  for key in ('input_ids', 'image_sizes', 'loss_mask'):
    np.testing.assert_array_equal(bucket[key], padded[key])
  model = models.build(config)
  # Host-drawn weights: compiling the random init would cost more than the whole test.
  rng = np.random.default_rng(0)
  params = traverse_util.unflatten_dict(
      {k: (0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
       for k, v in models.abstract_params(config).items()}, sep='/')
  num = np.maximum(np.sum(padded['loss_mask'][:, 1:]), 1).astype(np.float32)
  loss = {k: float(jax.jit(lambda p, b: losses.loss_fn(p, b, model=model, num_tokens=num)[0])(
      params, b)) for k, b in (('bucket', bucket), ('max', padded))}
  assert np.isfinite(loss['max']) and loss['max'] > 1
  np.testing.assert_allclose(loss['bucket'], loss['max'], rtol=1e-6)


def test_bad_images_and_samples_are_counted(tmp_path):
  config = anyres_config(tmp_path)
  long_first = ' '.join(['What color is the circle?'] * 12)
  records = [
      record([png(1, 300)]),        # no feature row survives unpadding
      record([png(40000, 1)]),      # past the side the model's tables handle
      record([b'not an image']),
      record([png(64, 64)], before=long_first),  # its 88 image tokens would be cut
      record([png(30, 64), png(30, 64)]),  # data.max_images=1
  ] + [record([png(30, 64, i)]) for i in range(3)]
  it = iterate(config, records)
  rows = [b for b in it]
  assert it.stats == {'image_too_small_for_grid': 1, 'image_too_large_for_grid': 1,
                      'corrupt_image': 1, 'image_tokens_do_not_fit': 1, 'too_many_images': 1}
  sizes = np.concatenate([jax.device_get(b['image_sizes'])[:, 0] for b in rows])
  assert sorted(map(tuple, sizes[sizes[:, 0] > 0])) == [(30, 64)] * 3


def test_bad_config_and_token_counts_are_refused(tmp_path):
  config = anyres_config(tmp_path)
  config.model.anyres.pinpoints = [[32, 48]]
  config.data.anyres_tiles = 'all'
  with pytest.raises(Exception) as e:
    validate.validate_config(config, 8, 1)
  assert 'model.anyres.pinpoints' in str(e.value) and 'data.anyres_tiles' in str(e.value)

  config = anyres_config(tmp_path)
  batch = jax.device_get(next(iterate(config, [record([png(30, 64, i)]) for i in range(8)])))
  model = models.build(config)
  train.check_anyres_batch(model, jax.tree.map(jax.numpy.asarray, batch))  # fine as made
  ids = batch['input_ids'].copy()
  ids[3, np.flatnonzero(ids[3] == config.model.image_token_id)[-1]] = 5  # one token short
  with pytest.raises(ValueError, match=r'Row 3: image 0 \(size \(30, 64\)\) needs 52'):
    train.check_anyres_batch(model, {**jax.tree.map(jax.numpy.asarray, batch),
                                     'input_ids': jax.numpy.asarray(ids)})


def test_shapes_anyres_variant_learns(tmp_path):
  """configs/shapes.py:anyres=1 (scenes of aspect ratios 1/3 to 3), 8 steps: loss falls."""
  config = shapes_config.get_config(f'anyres=1,steps=8,train=32,batch_size=8,'
                                    f'data_dir={tmp_path / "data"}')
  config.data.shapes.validation = config.data.shapes.test = 8
  config.train.log_every = 1
  config.data.eval_split = config.data.test_split = ''  # training only: one compile
  config.optimizer.warmup_steps = 2
  config.model.scan_layers = True  # the same layers, one compiled layer body instead of four
  config.checkpoint.interval = 100  # only the final save
  config.checkpoint.async_save = False
  train.train_and_evaluate(config, tmp_path / 'run')
  records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  loss = [r['loss'] for r in records if r['split'] == 'train']
  assert len(loss) == 8 and np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.5, loss
  assert all(r.get('batch_shapes', 0) >= 1 for r in records if r['split'] == 'train')


@pytest.mark.parametrize('arg', ['stage=pretrain', 'stage=finetune', 'size=tiny,stage=finetune'])
def test_llava_next_recipe_is_valid(arg):
  from configs import llava_next  # pylint: disable=g-import-not-at-top
  config = llava_next.get_config(arg)
  with config.unlocked():
    config.data.manual_dir = config.init.path = '/data'
    config.init.vision_path = config.init.decoder_path = '/data'
  validate.validate_config(config, 8, 1)
  if 'finetune' in arg:  # anyres, tower unfrozen at a tenth of the decoder's rate
    assert config.train.stage == 'full'
    assert dict(config.optimizer.module_lr) == {'^vision/': pytest.approx(2e-6)}
    size = 672 if 'tiny' not in arg else 64
    assert models.num_image_tokens(config, image_size=(size, size)) == (
        2928 if 'tiny' not in arg else 88)  # 2x2 grid: n^2 + 2n * (2n + 1)
  else:
    assert not config.model.anyres.pinpoints and config.train.stage == 'pretrain'
