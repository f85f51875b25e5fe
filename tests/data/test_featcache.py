"""Cached frozen vision features (lvm/features_cache.py, lvm/data/feature_cache.py): the
builder resumes shard by shard, a step from the cache equals the live-tower step (loss and
projector gradients within 1e-5), a cached run resumes onto the live run's losses, and a
cache that does not fit the run is refused naming the key."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from lvm import features_cache
from lvm import flops
from lvm import losses
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm import train
from lvm import validate
from lvm.data import feature_cache
from lvm.data import pipeline
from tests.data.conftest import tiny_shapes_config

SHARD = 40  # 96 training records: shards of 40, 40 and 16


def _config(shapes_dir, cache_dir='', **data):
  config = tiny_shapes_config(shapes_dir, **data)
  with config.unlocked():
    config.train.stage = 'pretrain'  # projector only: the tower is frozen
    config.optimizer.schedule = 'constant'  # a 2-step run's rates are a 3-step run's
    config.train.eval_batches = 1
    config.data.vision_features_cache = str(cache_dir)
  return config


@pytest.fixture(scope='module')
def cache(shapes_dir, tmp_path_factory):
  """A cache built in two calls, the first stopped after one shard (as if killed while
  writing the second: its partial temporary file is left behind)."""
  cache_dir = tmp_path_factory.mktemp('features')
  config = _config(shapes_dir)
  first = features_cache.build(config, str(cache_dir), batch_size=16, shard_size=SHARD,
                               max_shards=1, log=lambda _: None)
  partial = tmp_path_factory.mktemp('partial') / 'cache'
  shutil.copytree(cache_dir, partial)
  stray = cache_dir / f'.{feature_cache.shard_name(1, 3)}.tmp'
  stray.write_bytes(b'half a shard')
  second = features_cache.build(config, str(cache_dir), batch_size=16, shard_size=SHARD,
                                log=lambda _: None)
  return {'dir': cache_dir, 'partial': partial, 'first': first, 'second': second}


def test_builder_resumes_shard_by_shard(cache):
  assert (cache['first']['written'], cache['first']['skipped']) == (1, 0)
  assert (cache['second']['written'], cache['second']['skipped']) == (2, 1)
  names = sorted(os.listdir(cache['dir']))
  assert names == ['features-00000-of-00003.array_record', 'features-00001-of-00003.array_record',
                   'features-00002-of-00003.array_record', 'manifest.json']  # stray tmp replaced
  manifest = feature_cache.read_manifest(cache['dir'])
  assert manifest['num_records'] == 96 and manifest['feature_shape'] == [16, 32]
  assert manifest['dtype'] == 'float32'  # the tiny config's compute dtype
  reader = feature_cache.FeatureCache(cache['dir'], manifest)
  counts = [len(reader.record(i)[0]) for i in range(96)]
  assert cache['first']['images'] + cache['second']['images'] == sum(counts) > 0
  reader.close()


def _batch(config, mesh):
  it = pipeline.make_iterator(config, 'train', mesh)
  batch = next(it)
  it.close()
  return batch


def test_cached_step_equals_live_tower(shapes_dir, cache):
  live_config = _config(shapes_dir)
  cached_config = _config(shapes_dir, cache['dir'])
  mesh = sharding.make_mesh(live_config.mesh)
  live, cached = _batch(live_config, mesh), _batch(cached_config, mesh)
  assert 'images' not in cached and cached['image_features'].shape == (8, 1, 16, 32)
  for key in ('input_ids', 'loss_mask', 'attention_mask'):
    np.testing.assert_array_equal(live[key], cached[key])

  model = models.build(live_config)
  inputs = state_lib.dummy_inputs(live_config, 8)  # the init the builder's tower takes
  params = jax.jit(lambda r: models.random_params(live_config, r, *inputs))(
      jax.random.key(live_config.train.seed))
  # The cached features are the tower's selected features of the live images.
  tower = models.build_vision(live_config)
  images = np.asarray(live['images'])
  feats = tower.apply({'params': params['vision']}, images.reshape(-1, *images.shape[2:]))
  np.testing.assert_allclose(np.asarray(cached['image_features']).reshape(feats.shape), feats,
                             atol=1e-6, rtol=1e-6)

  def loss_and_grads(batch):
    num_tokens = np.maximum(np.sum(np.asarray(batch['loss_mask'])[:, 1:]), 1.0)
    def loss(proj):
      return losses.loss_fn({**params, 'projector': proj}, batch, model=model,
                            num_tokens=num_tokens)[0]
    with step_lib.mesh_context(mesh, sharding.rules(live_config)):
      return jax.jit(jax.value_and_grad(loss))(params['projector'])

  (live_loss, live_grads), (cached_loss, cached_grads) = map(loss_and_grads, (live, cached))
  assert abs(float(live_loss) - float(cached_loss)) <= 1e-5 * abs(float(live_loss))
  for a, b in zip(jax.tree.leaves(live_grads), jax.tree.leaves(cached_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def _train_losses(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train' and 'loss' in r}


def test_cached_run_resumes_onto_the_live_losses(shapes_dir, cache, tmp_path):
  """A live 3-step run checkpoints at steps 2 and 3; a cached run resumed from its step-2
  checkpoint (train state and data cursors) makes the live run's step 3."""
  live_config = _config(shapes_dir, eval_split='', test_split='')
  live_config.train.num_steps = 3
  train.train_and_evaluate(live_config, tmp_path / 'live')
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'live', resumed)
  shutil.rmtree(resumed / 'checkpoints' / '3')
  os.remove(resumed / 'metrics.jsonl')
  cached_config = _config(shapes_dir, cache['dir'], eval_split='', test_split='')
  cached_config.train.num_steps = 3
  train.train_and_evaluate(cached_config, resumed)
  live, cached = _train_losses(tmp_path / 'live'), _train_losses(resumed)
  assert sorted(cached) == [3]
  assert cached[3] == pytest.approx(live[3], rel=1e-5)
  assert live[3] < live[1]


def test_cached_steps_count_no_tower_flops(shapes_dir, tmp_path):
  live = flops.model_flops(_config(shapes_dir), 8, 64)
  cached = flops.model_flops(_config(shapes_dir, tmp_path), 8, 64)
  assert live['parts']['vision'] > 0 and cached['parts']['vision'] == 0
  assert cached['total'] == live['total'] - live['parts']['vision']


def _problems(config):
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, 8)
  return str(e.value)


def test_unfit_caches_are_refused_naming_the_key(shapes_dir, cache, tmp_path):
  message = _problems(_config(shapes_dir, cache['partial']))
  assert 'data.vision_features_cache' in message and '2 of 3 shards missing' in message
  other = _config(shapes_dir, cache['dir'])
  other.model.vision.feature_layer = -1
  other.data.image_aspect = 'resize'
  message = _problems(other)
  assert 'model.vision.feature_layer: cache -2, this run -1' in message
  assert "data.image_aspect: cache 'pad', this run 'resize'" in message
  assert 'data.packing' in _problems(_config(shapes_dir, cache['dir'], packing=True))
  assert 'no manifest.json' in _problems(_config(shapes_dir, tmp_path))
  mixed = _config(shapes_dir, cache['dir'])
  mixed.data.mixture = ({'dataset': 'shapes', 'weight': 1},)
  assert 'a mixture (data.mixture) reads several datasets' in _problems(mixed)

  trains_tower = _config(shapes_dir, cache['dir'])
  trains_tower.train.stage = 'full'
  assert "config.train.stage ('full') trains the vision tower" in _problems(trains_tower)
  mesh = sharding.make_mesh(trains_tower.mesh)
  tx, _ = optim.make(trains_tower.optimizer, 5)
  with pytest.raises(ValueError, match=r'config.train.stage .* trains \d+ vision tower'):
    state_lib.StateFactory(trains_tower, models.build(trains_tower), tx, mesh,
                           sharding.rules(trains_tower))
  with pytest.raises(ValueError, match='feature_layer: cache -2, this run -1'):
    features_cache.build(other, str(cache['dir']), shard_size=SHARD)
