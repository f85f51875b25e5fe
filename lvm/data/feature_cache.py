"""Cached frozen vision features: the store, its fingerprint, and the checks on using it.

Stage 1 (LLaVA's projector alignment) trains the projector alone: the vision tower is frozen,
so its selected features (`model.vision.feature_layer`, `select`) are the same every epoch.
`python -m lvm.features_cache` computes them once per record of the training split and
writes them here; a run with `config.data.vision_features_cache=DIR` then reads them in
place of pixels, and the model projects them without running the tower
(`LLaVA.__call__(..., image_features=...)`).

Layout of DIR:
  manifest.json                           format, fingerprint, record count, shard size, the
                                          per-image feature shape [P, Dv] and dtype
  features-SSSSS-of-NNNNN.array_record    records [S * shard_size, (S + 1) * shard_size) of
                                          the split, in order, one array_record record each

array_record (the TFDS data sources' own store: random access by index, one file per shard)
keeps a sample's features in one record: a 4-byte little-endian header length, a JSON
header `{"n": images, "error": reason or null}`, then `n x P x Dv` values in the manifest's
dtype (the tower's output in the compute dtype, `model.dtype`). A record whose images could
not be decoded keeps the reason, and training drops and counts it as the live pipeline does.

Crash safety: a shard is written to a temporary name and renamed when whole; a shard file
that exists is complete. The builder skips those on restart, and a run refuses a cache
with a shard missing (it does not cover the split).

The fingerprint is every config field the features depend on (`fingerprint`); a run whose
fields differ is refused, naming the keys.
"""

import json
import os
import re
import struct
import threading

import numpy as np

FORMAT = 'lvm.feature_cache/1'
MANIFEST = 'manifest.json'
INDEX_KEY = '_feature_cache_index'  # the record's index in the split, added by IndexedSource
# Tower parameter paths a trainable pattern is tried on before the model is traced (the
# exact check, on every path, is `check_trainable`).
_TOWER_PATHS = ('vision/patch_embedding', 'vision/class_embedding', 'vision/position_embedding',
                'vision/pre_layrnorm/scale', 'vision/layers/self_attn/q_proj/kernel',
                'vision/layers/mlp/fc1/kernel', 'vision/layers_0/layer_norm1/scale')


def fingerprint(config) -> dict:
  """The config fields the cached features depend on, by dotted key (JSON values).

  The tower (every `model.vision` field, the compute and storage dtypes, where its weights
  come from: `init.*`, and `train.seed` for a random init), the images (dataset, its
  settings and folders, the split, aspect handling, mean/std, `data.max_images`).
  """
  d, m, init = config.data, config.model, config.init
  vision = m.vision.to_dict()
  layer = vision.get('feature_layer')
  vision['feature_layer'] = list(layer) if isinstance(layer, (list, tuple)) else layer
  fields = {f'model.vision.{k}': v for k, v in sorted(vision.items())}
  fields.update({
      'model.dtype': m.dtype, 'model.param_dtype': m.param_dtype,
      'init.kind': init.kind, 'init.path': init.path, 'init.vision_path': init.vision_path,
      'train.seed': int(config.train.seed) if init.kind == 'random' else None,
      'data.dataset': d.dataset, 'data.data_dir': d.data_dir, 'data.manual_dir': d.manual_dir,
      'data.train_split': d.train_split, 'data.image_aspect': d.image_aspect,
      'data.image_mean': [float(x) for x in d.image_mean],
      'data.image_std': [float(x) for x in d.image_std],
      'data.max_images': int(d.max_images),
  })
  group = d.get(d.dataset)
  if hasattr(group, 'to_dict'):
    fields.update({f'data.{d.dataset}.{k}': v for k, v in sorted(group.to_dict().items())})
  return json.loads(json.dumps(fields))  # tuples -> lists, as read back from the manifest


def shard_name(shard: int, num_shards: int) -> str:
  return f'features-{shard:05d}-of-{num_shards:05d}.array_record'


def read_manifest(cache_dir) -> dict | None:
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_manifest(cache_dir, manifest: dict):
  """Writes the manifest atomically (a killed write leaves the old one or none)."""
  os.makedirs(cache_dir, exist_ok=True)
  tmp = os.path.join(cache_dir, f'.{MANIFEST}.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(cache_dir, MANIFEST))


def fingerprint_mismatch(config, manifest) -> list[str]:
  """'key: cache X, run Y' for each fingerprint field where they differ."""
  mine, theirs = fingerprint(config), manifest.get('fingerprint', {})
  return [f'{k}: cache {theirs.get(k)!r}, this run {mine.get(k)!r}'
          for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def missing_shards(cache_dir, manifest) -> list[str]:
  n = int(manifest['num_shards'])
  return [shard_name(s, n) for s in range(n)
          if not os.path.exists(os.path.join(cache_dir, shard_name(s, n)))]


def encode(features, error: str | None = None) -> bytes:
  """One record: header + the sample's features float[n, P, Dv] (n may be 0)."""
  header = json.dumps({'n': int(features.shape[0]), 'error': error}).encode()
  return struct.pack('<I', len(header)) + header + np.ascontiguousarray(features).tobytes()


def decode(data: bytes, shape, dtype) -> tuple[np.ndarray, str | None]:
  (size,) = struct.unpack('<I', data[:4])
  header = json.loads(data[4:4 + size])
  feats = np.frombuffer(data[4 + size:], dtype).reshape(header['n'], *shape)
  return feats, header['error']


def numpy_dtype(name: str):
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (bfloat16 for numpy)
  return np.dtype(getattr(ml_dtypes, name)) if name == 'bfloat16' else np.dtype(name)


class FeatureCache:
  """Random access to a finished cache: `features(index, n)` -> float[n, P, Dv].

  Thread-safe (the pipeline's workers share it): each shard's reader is opened once and
  read under its own lock.
  """

  def __init__(self, cache_dir, manifest):
    self.dir, self.manifest = str(cache_dir), manifest
    self.shape = tuple(manifest['feature_shape'])
    self.dtype = numpy_dtype(manifest['dtype'])
    self.shard_size, self.num_shards = int(manifest['shard_size']), int(manifest['num_shards'])
    self._readers, self._locks = {}, [threading.Lock() for _ in range(self.num_shards)]
    self._open_lock = threading.Lock()

  def _reader(self, shard):
    with self._open_lock:
      if shard not in self._readers:
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        path = os.path.join(self.dir, shard_name(shard, self.num_shards))
        self._readers[shard] = array_record_module.ArrayRecordReader(
            path, 'readahead_buffer_size:0')
      return self._readers[shard]

  def record(self, index: int) -> tuple[np.ndarray, str | None]:
    """(features float[n, P, Dv], error reason or None) of record `index` of the split."""
    shard, offset = divmod(int(index), self.shard_size)
    reader = self._reader(shard)
    with self._locks[shard]:
      (data,) = reader.read([offset])
    return decode(data, self.shape, self.dtype)

  def close(self):
    with self._open_lock:
      for reader in self._readers.values():
        reader.close()
      self._readers = {}


class IndexedSource:
  """A data source whose records carry their own index (`INDEX_KEY`), to find their features."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return {**self.source[index], INDEX_KEY: int(index)}


def open_for(config, split: str, num_records: int) -> FeatureCache | None:
  """The cache a run reads for `split`: `data.vision_features_cache` on the training split,
  else None. Raises ValueError, naming the key, if it does not fit the run or the split."""
  cache_dir = config.data.get('vision_features_cache')
  if not cache_dir or split != config.data.train_split:
    return None
  problems = cache_problems(config, cache_dir)
  manifest = read_manifest(cache_dir)
  if not problems and int(manifest['num_records']) != int(num_records):
    problems.append(f'it holds {manifest["num_records"]} records but split {split!r} has '
                    f'{num_records}: it does not cover the dataset')
  if problems:
    raise ValueError(f'config.data.vision_features_cache={cache_dir!r}: ' + '; '.join(problems)
                     + '. Fix: rebuild it with python -m lvm.features_cache (same --config) '
                     'or unset the key to run the tower live.')
  return FeatureCache(cache_dir, manifest)


def cache_problems(config, cache_dir) -> list[str]:
  """Why the cache in `cache_dir` cannot serve `config` (empty: it can, record count aside)."""
  manifest = read_manifest(cache_dir)
  if manifest is None:
    return [f'no {MANIFEST} there (build it with python -m lvm.features_cache)']
  if manifest.get('format') != FORMAT:
    return [f'format {manifest.get("format")!r}, expected {FORMAT!r}']
  problems = []
  diff = fingerprint_mismatch(config, manifest)
  if diff:
    problems.append('made with another tower, feature selection or preprocessing ('
                    + '; '.join(diff) + ')')
  missing = missing_shards(cache_dir, manifest)
  if missing:
    problems.append(f'{len(missing)} of {manifest["num_shards"]} shards missing (e.g. '
                    f'{missing[0]}): it does not cover the dataset; rerun the builder to '
                    'finish it')
  return problems


def check_config(config, problems):
  """`data.vision_features_cache`'s problems (`lvm.validate` calls it; the trainable check is
  `check_trainable`, which needs the parameter paths)."""
  cache_dir = config.data.get('vision_features_cache')
  key = 'data.vision_features_cache'
  if cache_dir is None or cache_dir == '':
    return
  if not isinstance(cache_dir, str):
    problems.add(key, f'must be a folder path, got {cache_dir!r}', "'' runs the tower live")
    return
  if config.data.get('packing'):
    problems.add(key, 'packed rows (data.packing) do not read cached features yet',
                 'set data.packing=False, or unset data.vision_features_cache')
  if config.data.get('mixture'):
    problems.add(key, 'a mixture (data.mixture) reads several datasets, but the cache holds '
                 "the features of data.dataset's training split only",
                 'unset data.mixture or data.vision_features_cache')
  if config.model.get('anyres') and config.model.anyres.get('pinpoints'):
    problems.add(key, 'anyres models (model.anyres.pinpoints) cannot use cached features: '
                 'their tiles depend on each image', 'unset data.vision_features_cache')
  if config.train.get('frozen_quantization', 'none') != 'none':
    problems.add(key, f'the cache holds the float tower\'s features, but train.'
                 f'frozen_quantization={config.train.frozen_quantization!r} quantizes it',
                 "set train.frozen_quantization='none' or unset data.vision_features_cache")
  try:
    from lvm import lora  # pylint: disable=g-import-not-at-top  (imports the models)
    pattern = re.compile(lora.trainable_regex(config))
  except (ValueError, re.error):
    pattern = None  # a bad stage or regex is reported under its own key
  trained = [p for p in _TOWER_PATHS if pattern is not None and pattern.search(p)]
  if trained:
    from lvm import optim  # pylint: disable=g-import-not-at-top
    stage_key = optim.trainable_key(config.train)
    problems.add(key, f'config.{stage_key} ({config.train.stage!r}) trains the vision tower '
                 f'(e.g. {trained[0]}), but cached features are those of a frozen tower',
                 "freeze it (train.stage='pretrain' or 'finetune') or unset the key")
  for problem in cache_problems(config, cache_dir):
    problems.add(key, f'{cache_dir!r}: {problem}',
                 'rebuild it with python -m lvm.features_cache --config=(this config) '
                 f'--cache_dir={cache_dir}, or unset the key')


def check_trainable(config, trainable_paths) -> None:
  """Raises ValueError if a cached run would train a tower parameter (the cache holds the
  features of the tower as it was)."""
  if not config.data.get('vision_features_cache'):
    return
  tower = [p for p in trainable_paths if p.startswith('vision/')]
  if tower:
    from lvm import optim  # pylint: disable=g-import-not-at-top
    key = optim.trainable_key(config.train)
    raise ValueError(
        f'config.data.vision_features_cache is set but config.{key} '
        f'({config.train.stage!r}) trains {len(tower)} vision tower parameters (e.g. '
        f'{tower[0]}): cached features are those of a frozen tower. Fix: freeze the tower '
        "(train.stage='pretrain' or 'finetune') or unset data.vision_features_cache.")
