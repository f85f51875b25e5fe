"""Computes the frozen vision tower's features of the training split once (stage-1 cache).

  python -m lvm.features_cache --config=configs/llava15.py:size=7b,stage=pretrain \
      --config.data.manual_dir=/data/llava --cache_dir=/data/llava_feats
  python -m lvm.main --config=configs/llava15.py:size=7b,stage=pretrain \
      --config.data.manual_dir=/data/llava --config.data.vision_features_cache=/data/llava_feats \
      --workdir=/runs/stage1

Every record of `config.data.train_split` gets the tower's selected features of its images,
exactly what the projector consumes (`model.vision.feature_layer`, `select`), in the
compute dtype (`model.dtype`), from the tower weights the run starts from (`config.init`).
The tower runs jitted on the config's mesh, its parameters sharded by the logical rules and
its image batch over the batch axes, as in training. The store and its guarantees (written
with array_record, one shard at a time, a killed run resumed shard by shard, a fingerprint
of the config) are `lvm.data.feature_cache`'s. Running the command again on the same
`--cache_dir` continues where it stopped; a finished cache is left as is.

One process: on several hosts, build on one (the tower is small next to the decoder).
"""

import collections
import concurrent.futures
import math
import os
import time

from absl import flags
from ml_collections import config_flags

from lvm import cli

DEFAULT_SHARD_SIZE = 4096  # records per file: LLaVA-1.5's 558K make 137 shards of 4.8 GB


def _load_images(record, max_images, load):
  """(error reason or None, [float32[H, W, 3]]) of a record's images."""
  from lvm.data import images as images_lib  # pylint: disable=import-outside-toplevel
  encoded = list(record['images'])
  if len(encoded) > max_images:
    return 'too_many_images', []  # the pipeline drops it for its text before reading these
  try:
    return None, [load(x) for x in encoded]
  except images_lib.ImageError as e:
    return e.reason, []


class _Tower:
  """The tower jitted on the mesh: float32[b, H, W, 3] -> features [b, P, Dv] (on device)."""

  def __init__(self, config, mesh, log):
    import jax  # pylint: disable=import-outside-toplevel
    from lvm import models, optim, sharding  # pylint: disable=import-outside-toplevel
    from lvm import state as state_lib  # pylint: disable=import-outside-toplevel
    from lvm import step as step_lib  # pylint: disable=import-outside-toplevel
    self.module = models.build_vision(config)
    # The weights the run starts from: the same path as training (config.init), then the
    # tower's subtree; its shardings are the training state's.
    tx, _ = optim.make(config.optimizer, 1)
    factory = state_lib.StateFactory(config, models.build(config), tx, mesh,
                                     sharding.rules(config))
    self.context = lambda: step_lib.mesh_context(mesh, sharding.rules(config))
    shardings = factory.param_shardings['vision']
    if config.init.kind == 'random':
      # The tower's subtree of the run's own random init (same seed, same tracing inputs);
      # XLA drops the rest of the model's init, which costs most of the compile.
      batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
      inputs = state_lib.dummy_inputs(config, batch)
      with self.context():
        self.params = jax.jit(lambda r: models.random_params(config, r, *inputs)['vision'],
                              out_shardings=shardings)(jax.random.key(config.train.seed))
    else:
      self.params = state_lib.initial_params(config, factory, log)['vision']
    self.jitted = jax.jit(lambda p, x: self.module.apply({'params': p}, x),
                          in_shardings=(shardings,
                                        sharding.batch_sharding(mesh, 4)),
                          out_shardings=sharding.batch_sharding(mesh, 3))

  def __call__(self, pixels):
    with self.context():
      return self.jitted(self.params, pixels)


def build(config, cache_dir: str, *, batch_size: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
          max_shards: int = 0, log=print) -> dict:
  """Writes the features of every record of `config.data.train_split` to `cache_dir`.

  Args:
    config: the training run's config (its `data.vision_features_cache` is ignored here).
    cache_dir: the cache folder; an unfinished cache there is continued, a finished one kept.
    batch_size: images per tower call (rounded up to the batch mesh axes); 0: the config's
      `train.batch_size`.
    shard_size: records per shard file (the unit of resumption). A cache keeps the shard
      size it was started with.
    max_shards: > 0: stop after writing this many shards (tests; a partial cache).
    log: progress lines.

  Returns:
    {'records', 'shards', 'written', 'skipped', 'images', 'errors': {reason: count},
     'seconds'}: this call's work (`written` shards; `skipped` already there).

  Raises:
    ValueError: the config does not validate, is anyres, runs on several processes, or
      `cache_dir` holds a cache of another config (naming the differing keys).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from lvm import sharding, train, validate  # pylint: disable=import-outside-toplevel
  from lvm import models  # pylint: disable=import-outside-toplevel
  from lvm.data import feature_cache  # pylint: disable=import-outside-toplevel
  from lvm.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel

  start_time = time.time()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.vision_features_cache = ''  # the cache being built is not read
  validate.validate_config(config, jax.device_count(), jax.process_count())
  if jax.process_count() > 1:
    raise ValueError('lvm.features_cache runs on one process (its devices sharded as the '
                     'config\'s mesh says); run it on one host')
  if config.model.anyres.pinpoints:
    raise ValueError('model.anyres.pinpoints is set: anyres tiles depend on each image and '
                     'are not cached (data.vision_features_cache is for fixed-size towers)')
  train.prepare_data(config)
  source = pipeline.data_source(config, config.data.train_split)
  num_records = len(source)
  tower_module = models.build_vision(config)
  dtype = str(np.dtype(models.dtype(config.model.dtype)))
  manifest = {
      'format': feature_cache.FORMAT, 'fingerprint': feature_cache.fingerprint(config),
      'num_records': num_records, 'shard_size': int(shard_size),
      'num_shards': max(1, -(-num_records // int(shard_size))),
      'feature_shape': [tower_module.num_tokens, tower_module.out_features], 'dtype': dtype}
  existing = feature_cache.read_manifest(cache_dir)
  if existing is not None:
    shard_size, manifest['shard_size'] = existing['shard_size'], existing['shard_size']
    manifest['num_shards'] = existing['num_shards']
    diff = feature_cache.fingerprint_mismatch(config, existing) + [
        f'{k}: cache {existing.get(k)!r}, this run {manifest[k]!r}'
        for k in ('format', 'num_records', 'feature_shape', 'dtype')
        if existing.get(k) != manifest[k]]
    if diff:
      raise ValueError(f'--cache_dir={cache_dir} holds a cache of another config ('
                       + '; '.join(diff) + '); use another folder or delete it')
  else:
    feature_cache.write_manifest(cache_dir, manifest)
  num_shards = manifest['num_shards']
  todo = [s for s in range(num_shards) if not os.path.exists(
      os.path.join(cache_dir, feature_cache.shard_name(s, num_shards)))]
  stats = {'records': num_records, 'shards': num_shards, 'written': 0,
           'skipped': num_shards - len(todo), 'images': 0, 'errors': collections.Counter()}
  if max_shards > 0:
    todo = todo[:max_shards]
  if not todo:
    stats.update(errors=dict(stats['errors']), seconds=time.time() - start_time)
    return stats

  mesh = sharding.make_mesh(config.mesh)
  tower = _Tower(config, mesh, log)
  axes = mesh.shape['data'] * mesh.shape['fsdp']
  per_call = -(-(batch_size or int(config.train.batch_size)) // axes) * axes
  d = config.data
  size = int(config.model.vision.image_size)
  load = lambda x: images_lib.load(x, size, d.image_aspect, tuple(d.image_mean),
                                   tuple(d.image_std))
  workers = max(int(d.num_workers), 1)
  pool = concurrent.futures.ThreadPoolExecutor(workers)

  def run_tower(pixels):
    """Dispatches the tower on a list of images, padded to whole calls (asynchronous)."""
    calls = []
    for i in range(0, len(pixels), per_call):
      chunk = np.zeros((per_call, size, size, 3), np.float32)
      part = pixels[i:i + per_call]
      chunk[:len(part)] = np.stack(part)
      calls.append((tower(chunk), len(part)))
    return calls

  def write_records(writer, loaded, calls):
    feats = [np.asarray(jax.device_get(out))[:n] for out, n in calls]
    feats = np.concatenate(feats) if feats else np.zeros((0, *manifest['feature_shape']))
    at = 0
    for error, pixels in loaded:
      writer.write(feature_cache.encode(feats[at:at + len(pixels)], error))
      at += len(pixels)
      if error:
        stats['errors'][error] += 1
    stats['images'] += at

  try:
    for shard in todo:
      name = feature_cache.shard_name(shard, num_shards)
      tmp = os.path.join(cache_dir, f'.{name}.tmp')
      writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
      first, last = shard * shard_size, min(num_records, (shard + 1) * shard_size)
      # Records in groups of `per_call`: the next group decodes while the tower runs.
      in_flight = None
      for begin in range(first, last, per_call):
        indices = range(begin, min(last, begin + per_call))
        loaded = list(pool.map(lambda i: _load_images(source[i], int(d.max_images), load),
                               indices))
        calls = run_tower([p for _, pixels in loaded for p in pixels])
        if in_flight is not None:
          write_records(writer, *in_flight)
        in_flight = (loaded, calls)
      if in_flight is not None:
        write_records(writer, *in_flight)
      writer.close()
      with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
      os.replace(tmp, os.path.join(cache_dir, name))  # whole, or absent
      stats['written'] += 1
      log(f'features: shard {shard + 1}/{num_shards} ({last - first} records) written, '
          f'{time.time() - start_time:.0f} s')
  finally:
    pool.shutdown()
  stats.update(errors=dict(stats['errors']), seconds=time.time() - start_time)
  return stats


def _define_flags():
  """The command's flags, defined only when it runs (importing this module from a test or
  another command must not claim --config)."""
  flags.DEFINE_string('cache_dir', None, 'Cache folder (default: the config\'s '
                      'data.vision_features_cache).')
  flags.DEFINE_integer('batch_size', 0, 'Images per tower call (0: train.batch_size).')
  flags.DEFINE_integer('shard_size', DEFAULT_SHARD_SIZE, 'Records per shard file.')
  config = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:args].',
                                           lock_config=True)
  flags.mark_flags_as_required(['config'])
  return config


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cache_dir = flags.FLAGS.cache_dir or config.data.vision_features_cache
  if not cache_dir:
    cli.fail('give --cache_dir (or --config.data.vision_features_cache)')
  try:
    stats = build(config, cache_dir, batch_size=flags.FLAGS.batch_size,
                  shard_size=flags.FLAGS.shard_size)
  except ValueError as e:
    cli.fail(str(e))
  print(f'features: {stats["records"]} records in {stats["shards"]} shards at {cache_dir} '
        f'({stats["written"]} written now, {stats["skipped"]} already there; '
        f'{stats["images"]} images; undecodable: {stats["errors"]}) in {stats["seconds"]:.1f} s')


if __name__ == '__main__':
  _CONFIG = _define_flags()
  cli.run(main)
