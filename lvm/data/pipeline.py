"""The input pipeline: deterministic, resumable, per-process, batches as global jax.Arrays.

The global batch has B rows. Row r reads the positions r, r + B, r + 2B, ... of the global
sample stream (epoch e is a seeded permutation of the split, `shuffle_seed` and e), skipping
samples that cannot be used (counted by reason in `.stats`). A row depends on nothing but its
own position in the stream, so:
  * each process reads only the rows its devices hold (its slice of the global batch), and the
    global batch is the same for any number of processes;
  * the state is one cursor per row (`get_state` / `set_state`), and a restored iterator
    continues with exactly the batches an uninterrupted one would have produced.
With `config.data.mixture`, the training split's stream position p reads from a source drawn
as a pure function of (`shuffle_seed`, p), each source with its own epochs
(`lvm.data.mixture`): the same guarantees hold, and `.mixture_counts` counts each source.
Host preprocessing of the rows runs in `config.data.num_workers` threads (PIL and numpy
release the GIL) and `config.data.prefetch` batches are prepared ahead in a background thread;
with `config.data.loader='grain'`, in that many grain worker processes instead
(`lvm.data.grain_rows`), the batches bit-identical.

Anyres models (`config.model.anyres.pinpoints` set; LLaVA-NeXT, OneVision) get each image as
tiles (`lvm.data.anyres.tiles`: base tile, then its grid) and its original size: `images
float[B, N, T, S, S, 3]` (unused tiles and absent images zero), `image_sizes int[B, N, 2]`
((0, 0) for an absent image), and exactly `lvm.models.num_image_tokens(config, image_size=)`
image tokens per image in `input_ids` (the count depends on the image; a sample whose images
cannot fit is dropped and counted, never cut). T is the batch's bucket
(`config.data.anyres_tiles`): 'bucket' rounds the most tiles any image of the global batch
needs up to a power of two (capped at the maximum, 1 + max grid tiles), so a run compiles at
most `len(tile_buckets(config))` shapes; 'max' always pads to the maximum (one shape). The
model ignores tiles past an image's own, so both give the same numbers. With several
processes the bucket is agreed on (the maximum over processes), so the global batch is the
same for any process count. `batch_shapes` lists the shapes delivered so far.

With `config.data.vision_features_cache` (the training split only; `lvm.data.feature_cache`)
a row carries the frozen tower's features of its images, `image_features [N, Pv, Dv]` in the
cache's dtype (absent slots zero), instead of `images`: the stream, its state and its counted
skips are those of the live pipeline, a record the cache marks undecodable being dropped
under the same reason.
"""

import atexit
import collections
import concurrent.futures
import json
import queue
import threading
import weakref
from typing import Any

import jax
import numpy as np

from lvm import sharding as sharding_lib
from lvm.data import anyres as anyres_lib
from lvm.data import feature_cache
from lvm.data import images as images_lib
from lvm.data import length_groups
from lvm.data import mixture as mixture_lib
from lvm.data import packing
from lvm.data import templates
from lvm.data import tokenizer as tokenizer_lib

STATE_VERSION = 1
# Stats keys counting the samples taken from / dropped of each mixture source.
TAKEN, DROPPED = 'mixture/', 'mixture_dropped/'
_LIVE = weakref.WeakSet()  # Iterators whose prefetch threads must stop before exit.


@atexit.register
def _stop_all():
  for it in list(_LIVE):
    it._close_thread()  # pylint: disable=protected-access
    it._close_grain()  # pylint: disable=protected-access


def data_source(config, split):
  """Random-access source of a prepared split (raises if `prepare` was not run)."""
  from lvm import data  # pylint: disable=g-import-not-at-top
  b = data.builder(config)
  if not b.is_prepared():
    raise FileNotFoundError(
        f'Dataset {config.data.dataset!r} is not prepared in {b.data_dir}; run '
        'lvm.data.prepare(config) first.')
  return b.as_data_source(split)


def splits(config) -> list[str]:
  """The splits of the prepared `config.data.dataset` (raises if `prepare` was not run)."""
  from lvm import data  # pylint: disable=g-import-not-at-top
  b = data.builder(config)
  if not b.is_prepared():
    raise FileNotFoundError(
        f'Dataset {config.data.dataset!r} is not prepared in {b.data_dir}; run '
        'lvm.data.prepare(config) first.')
  return list(b.info.splits.keys())


def num_examples(config, split) -> int:
  """Records in `split` (before any sample is dropped by the pipeline); a mixture's training
  split: the records of all its sources together."""
  if mixture_lib.applies(config, split):
    return mixture_lib.Mixture(config).size
  return len(data_source(config, split))


def config_name(config):
  return f'data.dataset={config.data.dataset}'


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def record_turns(record, template, caption_prompt=''):
  """LLaVA turns of a record; `plain` uses the caption when the dataset has one.

  With `caption_prompt`, a record with a caption gets one more turn at the end, that prompt
  answered by the caption: a dense description target beside the short answers. It comes
  last so that no earlier answer can be copied from it.
  """
  images = list(record['images'])
  caption = _text(record.get('caption', b''))
  if template == 'plain' and caption:
    return [{'from': 'human', 'value': templates.IMAGE_MARKER * len(images)},
            {'from': 'gpt', 'value': caption}], images
  turns = json.loads(_text(record['conversations']))
  if caption_prompt and caption:
    turns += [{'from': 'human', 'value': caption_prompt}, {'from': 'gpt', 'value': caption}]
  return turns, images


def anyres_layout(config):
  """The anyres layout of `config.model` (`lvm.models.anyres_tables.Layout`), or None."""
  from lvm.models import anyres_model  # pylint: disable=g-import-not-at-top
  return anyres_model.layout(config.model)


def max_tiles(config) -> int:
  """T of an anyres image slot padded to the maximum: the base tile + the most grid tiles."""
  from lvm.models import anyres_model  # pylint: disable=g-import-not-at-top
  return anyres_model.num_tiles(config.model)


def tile_buckets(config) -> list[int]:
  """The tile counts T a batch may have: powers of two below the maximum, and the maximum
  (`data.anyres_tiles='bucket'`), or only the maximum ('max')."""
  top = max_tiles(config)
  if config.data.anyres_tiles == 'max':
    return [top]
  return [t for t in (2 ** k for k in range(top.bit_length())) if t < top] + [top]


def tiles_needed(image_size, lay) -> int:
  """Tiles one image takes (base + grid); 0 for an absent image (size (0, 0))."""
  h, w = int(image_size[0]), int(image_size[1])
  if h <= 0 or w <= 0:
    return 0
  rows, cols = anyres_lib.grid_shape((h, w), lay.pinpoints, lay.tile_size)
  return 1 + rows * cols


def anyres_image_error(image_size, lay) -> str | None:
  """Why an image of `image_size` (height, width) cannot be used by the layout, or None.

  Too large: a side above what the model's in-jit tables handle exactly
  (`anyres_tables.MAX_SIDE`). Too small for its grid: so thin that no feature row (or column)
  of the grid survives unpadding; the model would get no grid features for it.
  """
  from lvm.models import anyres as anyres_models  # pylint: disable=g-import-not-at-top
  from lvm.models import anyres_tables  # pylint: disable=g-import-not-at-top
  h, w = int(image_size[0]), int(image_size[1])
  if max(h, w) > anyres_tables.MAX_SIDE:
    return 'image_too_large_for_grid'
  rows, cols = anyres_lib.grid_shape((h, w), lay.pinpoints, lay.tile_size)
  _, _, r, c = anyres_models.unpad_box((h, w), (rows, cols), lay.n)
  if r < 1 or c < 1:
    return 'image_too_small_for_grid'
  return None


class Processor:
  """One record -> (input_ids, loss_mask, attention_mask, images[, image_sizes]), fixed shapes.

  A fixed-size model's images are `float32[N, S, S, 3]`; an anyres model's are tiles
  `float32[N, T, S, S, 3]` (T = `max_tiles(config)`; the iterator cuts them to the batch's
  bucket) with `image_sizes int32[N, 2]`.
  """

  def __init__(self, config, tokenizer, num_image_tokens=None, train=False, features=None):
    d = config.data
    # A `feature_cache.FeatureCache`: rows get `image_features` from it (records must come
    # from a `feature_cache.IndexedSource`), not decoded images.
    self.features = features
    self.template, self.seq_len, self.max_images = d.template, d.seq_len, d.max_images
    self.system = d.system_prompt
    # Caption turns are a training target only: evaluation scores the dataset's own answers.
    self.caption_prompt = d.caption_prompt if train else ''
    self.layout = anyres_layout(config)
    if num_image_tokens is None and self.layout is None:
      from lvm import models  # pylint: disable=g-import-not-at-top
      num_image_tokens = models.num_image_tokens(config)
    self.tokenizer, self.num_image_tokens = tokenizer, num_image_tokens
    self.size = config.model.vision.image_size
    self.tiles = max_tiles(config) if self.layout is not None else 0
    self.aspect, self.mean, self.std = d.image_aspect, tuple(d.image_mean), tuple(d.image_std)

  def image_tokens(self, sizes):
    """Image tokens of each image (anyres: from its (height, width)); raises ImageError."""
    if self.layout is None:
      return self.num_image_tokens
    for size in sizes:
      reason = anyres_image_error(size, self.layout)
      if reason:
        raise images_lib.ImageError(reason, f'image of (height, width) {tuple(size)}')
    return [self.layout.num_image_tokens(size) for size in sizes]

  def text(self, record, sizes=None):
    """(ids, mask) unpadded, and the encoded images; raises SampleError or ImageError.

    `sizes`: the images' (height, width), which an anyres model's token counts need (None:
    the images are decoded for them).
    """
    turns, images = record_turns(record, self.template, self.caption_prompt)
    if len(images) > self.max_images:
      raise templates.SampleError('too_many_images',
                                  f'{len(images)} > data.max_images={self.max_images}')
    if self.layout is not None and sizes is None:
      sizes = [decoded.size[::-1] for decoded, _ in map(images_lib.decode, images)]
    ids, mask = templates.encode_example(self.template, turns, self.tokenizer,
                                         self.image_tokens(sizes or []), self.seq_len,
                                         len(images), self.system)
    return ids, mask, images

  def __call__(self, record):
    if self.layout is not None:
      return self._anyres(record)
    ids, mask, images = self.text(record)
    if self.features is not None:
      return self._cached(record, ids, mask, len(images))
    pixels = np.zeros((self.max_images, self.size, self.size, 3), np.float32)
    for k, data in enumerate(images):
      pixels[k] = images_lib.load(data, self.size, self.aspect, self.mean, self.std)
    return self.pad(ids, mask, pixels)

  def _cached(self, record, ids, mask, num_images):
    feats, error = self.features.record(record[feature_cache.INDEX_KEY])
    if error:  # the builder could not decode an image of this record
      raise images_lib.ImageError(error, 'recorded by the feature cache')
    if len(feats) != num_images:
      raise ValueError(f'feature cache record {record[feature_cache.INDEX_KEY]} has '
                       f'{len(feats)} images but the record has {num_images}: the cache does '
                       'not match data.vision_features_cache\'s dataset')
    out = self.pad(ids, mask, None)
    out['image_features'] = self.empty_features()
    out['image_features'][:num_images] = feats
    return out

  def empty_features(self):
    return np.zeros((self.max_images, *self.features.shape), self.features.dtype)

  def _anyres(self, record):
    _, encoded = record_turns(record, self.template, self.caption_prompt)
    decoded = [images_lib.decode(b)[0] for b in encoded[:self.max_images]]
    sizes = [im.size[::-1] for im in decoded]  # PIL gives (width, height)
    ids, mask, _ = self.text(record, sizes)
    lay = self.layout
    pixels = np.zeros((self.max_images, self.tiles, self.size, self.size, 3), np.float32)
    image_sizes = np.zeros((self.max_images, 2), np.int32)
    for k, im in enumerate(decoded):
      pixels[k], _ = anyres_lib.pad_tiles(
          anyres_lib.tiles(im, lay.pinpoints, lay.tile_size, self.mean, self.std),
          self.tiles - 1)
      image_sizes[k] = sizes[k]
    out = self.pad(ids, mask, pixels)
    out['image_sizes'] = image_sizes
    return out

  def pad(self, ids, mask, pixels):
    n = len(ids)
    out_ids = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
    out_ids[:n] = ids
    out_mask = np.zeros((self.seq_len,), bool)
    out_mask[:n] = mask
    attention = np.zeros((self.seq_len,), bool)
    attention[:n] = True
    out = {'input_ids': out_ids, 'loss_mask': out_mask, 'attention_mask': attention}
    if pixels is not None:
      out['images'] = pixels
    return out

  def empty(self):
    """A padding row (after the end of a finite stream): nothing attended or supervised."""
    if self.features is not None:
      return {**self.pad(np.zeros((0,), np.int32), np.zeros((0,), bool), None),
              'image_features': self.empty_features()}
    tiles = (self.tiles,) if self.layout is not None else ()
    out = self.pad(np.zeros((0,), np.int32), np.zeros((0,), bool),
                   np.zeros((self.max_images, *tiles, self.size, self.size, 3), np.float32))
    if self.layout is not None:
      out['image_sizes'] = np.zeros((self.max_images, 2), np.int32)
    return out


def local_rows(mesh, batch_size, seq_len) -> list[int]:
  """Global batch rows held by this process's devices, in increasing order."""
  s = sharding_lib.batch_sharding(mesh, 2)
  rows = set()
  for index in s.addressable_devices_indices_map((batch_size, seq_len)).values():
    rows.update(range(*index[0].indices(batch_size)))
  return sorted(rows)


class DataIterator:
  """Yields global batches: images f32[B, N, H, W, 3], input_ids i32[B, L], loss_mask and
  attention_mask bool[B, L], sharded over the batch mesh axes (anyres: images
  f32[B, N, T, H, W, 3] with T the batch's tile bucket, and image_sizes i32[B, N, 2]).

  `get_state()` (JSON-serializable) and `set_state()` resume exactly. With several processes,
  call `get_state` on all of them together (it gathers every process's rows).
  """

  def __init__(self, config, split, mesh, *, shuffle=True, num_epochs=None, source=None,
               tokenizer=None):
    self.config, self.split, self.mesh = config, split, mesh
    self.shuffle, self.num_epochs = bool(shuffle), num_epochs
    self.seed = int(config.data.shuffle_seed)
    self.batch_size = int(config.train.batch_size)
    axes = mesh.shape['data'] * mesh.shape['fsdp']
    if self.batch_size % axes:
      raise ValueError(f'config.train.batch_size={self.batch_size} must be divisible by the '
                       f'batch mesh axes data*fsdp={axes}.')
    # The training split of a mixture (lvm.data.mixture) is drawn from its sources.
    self.mixture = (mixture_lib.Mixture(config, shuffle) if source is None
                    and mixture_lib.applies(config, split) else None)
    if self.mixture is not None:
      self.source, self.size = None, self.mixture.size
    else:
      self.source = data_source(config, split) if source is None else source
      self.size = len(self.source)
    self._own_source = source is None  # reopened from the config where unpickled
    if self.size == 0:
      raise ValueError(f'Split {split!r} of {config.data.dataset!r} is empty.')
    tok = tokenizer or tokenizer_lib.load(config)
    train = split == config.data.train_split
    self.features = feature_cache.open_for(config, split, self.size)
    if self.features is not None:
      self.source = feature_cache.IndexedSource(self.source)
    self.processor = Processor(config, tok, train=train, features=self.features)
    anyres = self.processor.layout is not None
    self.buckets = tile_buckets(config) if anyres else None
    self._batch_shapes = []  # image shapes delivered so far, in order of first appearance
    # Training-split hooks: rows packed with several samples (lvm.data.packing), or epochs
    # ordered by LLaVA's modality-length grouping (lvm.data.length_groups).
    self.packer = packing.make(config, self.processor, self.processor.num_image_tokens, train)
    self.grouping = length_groups.make(config, self.source, self.processor, train)
    self.rows = local_rows(mesh, self.batch_size, config.data.seq_len)
    self.cursors = {r: 0 for r in self.rows}
    self._stats = collections.Counter()
    self._perms = collections.OrderedDict()
    self._lock = threading.Lock()
    self._thread = self._queue = None
    self._finished = False
    self._stop = threading.Event()
    workers = int(config.data.num_workers)
    self._grain = None  # a grain_rows.Loader, started from the cursors at the first batch
    self._use_grain = config.data.get('loader', 'threads') == 'grain'
    if self._use_grain and self.features is not None:
      raise ValueError("config.data.loader='grain' does not read "
                       "data.vision_features_cache yet; use data.loader='threads'.")
    self._pool = (concurrent.futures.ThreadPoolExecutor(workers)
                  if workers > 0 and not self._use_grain else None)
    ndims = {'images': 6 if anyres else 5, 'image_sizes': 3, 'image_features': 4}
    keys = packing.BATCH_KEYS if self.packer else packing.BATCH_KEYS[:4]
    keys += ('image_sizes',) if anyres else ()
    if self.features is not None:
      keys = ('image_features',) + keys[1:]
    self._shardings = {k: sharding_lib.batch_sharding(mesh, ndims.get(k, 2)) for k in keys}

  # --- the stream ----------------------------------------------------------------------------

  def _index(self, position):
    epoch, i = divmod(position, self.size)
    if not self.shuffle:
      return i
    with self._lock:
      if epoch not in self._perms:
        self._perms[epoch] = (
            self.grouping.order(self.seed, epoch, self.batch_size) if self.grouping else
            np.random.default_rng([self.seed, epoch]).permutation(self.size))
        if len(self._perms) > 4:
          self._perms.popitem(last=False)
      return int(self._perms[epoch][i])

  def _exhausted(self, position):
    return self.num_epochs is not None and position >= self.num_epochs * self.size

  def _too_many_drops(self, error, drops):
    del error
    # A row saw a whole epoch's share of samples with none usable: nothing will be.
    return ValueError(
        f'{config_name(self.config)}: no usable sample in split {self.split!r} '
        f'(dropped by reason: {dict(drops)}); check data.seq_len, data.template, '
        'data.max_images and the tokenizer (python -m lvm.data.inspect).')

  def _record(self, position):
    """(record, source name or None) at a stream position: a mixture's source, or the split."""
    if self.mixture is not None:
      s, record = self.mixture.record(position)
      return record, self.mixture.names[s]
    return self.source[self._index(position)], None

  def _fill_row(self, row, cursor):
    """(example, new cursor, Counter of drops) for one row starting at `cursor`.

    With a mixture, the Counter also counts each source's samples taken and dropped (keys
    `TAKEN + name`, `DROPPED + name`; `stats` leaves them out).
    """
    if self.packer:
      def read(c):
        position = row + self.batch_size * c
        return None if self._exhausted(position) else self._record(position)[0]
      taken = []
      example, new, drops = self.packer.fill_row(
          read, cursor, max(self.size // self.batch_size, 1) + 100, self._too_many_drops,
          taken=taken)
      if self.mixture is not None:
        for c in range(cursor, new):  # consumed: packed, or dropped
          name = self._record_source(row + self.batch_size * c)
          drops[(TAKEN if c in taken else DROPPED) + name] += 1
      return example, new, drops
    drops, by_source = collections.Counter(), collections.Counter()
    while True:
      position = row + self.batch_size * cursor
      if self._exhausted(position):
        return None, cursor, drops + by_source
      cursor += 1
      record, name = self._record(position)
      try:
        example = self.processor(record)
      except (templates.SampleError, images_lib.ImageError) as e:
        drops[e.reason] += 1
        if name is not None:
          by_source[DROPPED + name] += 1
        if sum(drops.values()) > max(self.size // self.batch_size, 1) + 100:
          raise self._too_many_drops(e, drops) from e
        continue
      if name is not None:
        by_source[TAKEN + name] += 1
      return example, cursor, drops + by_source

  def _record_source(self, position) -> str:
    return self.mixture.names[self.mixture.locate(position)[0]]

  # Picklable as its stream only (what `_fill_row` reads): grain's worker processes get it.
  _STREAM = ('config', 'split', 'shuffle', 'num_epochs', 'seed', 'batch_size', 'mixture',
             'source', 'size', 'processor', 'packer', 'grouping', 'features')

  def __getstate__(self):
    state = {k: getattr(self, k) for k in self._STREAM + ('_own_source',)}
    if self._own_source and self.mixture is None:
      # Reopened from the config: a TFDS source pickled by value would bring its builder
      # class, which TFDS would register again in the worker.
      state['source'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    if self.source is None and self.mixture is None:
      self.source = data_source(self.config, self.split)
    self._perms, self._lock = collections.OrderedDict(), threading.Lock()
    self._thread = self._grain = self._pool = None

  def _rows_by_grain(self, cursors):
    if self._grain is None:
      # Imported here: grain is needed only by runs that pick it (lvm.data.loaders).
      from lvm.data import grain_rows  # pylint: disable=import-outside-toplevel
      _LIVE.add(self)
      self._grain = grain_rows.Loader(self, self.rows, cursors,
                                      int(self.config.data.num_workers),
                                      max(int(self.config.data.prefetch), 1))
    return self._grain.next_rows(cursors)

  def _close_grain(self):
    if self._grain is not None:
      self._grain.close()
      self._grain = None

  def _next_local(self, cursors):
    rows = self.rows
    fn = lambda r: self._fill_row(r, cursors[r])
    if self._use_grain:
      results = self._rows_by_grain(cursors)
    else:
      results = list(self._pool.map(fn, rows)) if self._pool else [fn(r) for r in rows]
    drops = collections.Counter()
    examples, new = [], {}
    for r, (ex, c, d) in zip(rows, results):
      examples.append(ex)
      new[r] = c
      drops.update(d)
    done = all(ex is None for ex in examples)
    empty = (self.packer or self.processor).empty
    examples = [empty() if ex is None else ex for ex in examples]
    batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    return batch, new, drops, done

  def _all_done(self, done):
    if jax.process_count() == 1:
      return done
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.all(multihost_utils.process_allgather(np.asarray(done))))

  @staticmethod
  def _produce(ref, cursors, stats, out, stop):
    """Prefetch thread: holds the iterator weakly, so an abandoned iterator is collected."""
    while not stop.is_set():
      self = ref()
      if self is None:
        return
      try:
        batch, cursors, drops, done = self._next_local(cursors)  # pylint: disable=protected-access
        stats = collections.Counter(stats)
        stats.update(drops)
        item = (batch, dict(cursors), stats, done)
      except Exception as e:  # pylint: disable=broad-except
        item, done = e, True
      del self
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          if ref() is None:
            return
      if done:
        return

  def _bucket(self, batch, agree=True):
    """Cuts anyres tiles to the batch's bucket: the smallest one holding every image's tiles
    in the global batch (with `agree`, the maximum over processes; else this process's)."""
    if self.buckets is None:
      return batch
    lay = self.processor.layout
    need = max([tiles_needed(s, lay) for s in batch['image_sizes'].reshape(-1, 2)] + [1])
    if agree and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      need = int(np.max(multihost_utils.process_allgather(np.asarray(need, np.int32))))
    t = next(b for b in self.buckets if b >= need)
    return {**batch, 'images': batch['images'][:, :, :t]}

  @property
  def batch_shapes(self) -> list[tuple[int, ...]]:
    """The distinct global anyres `images` shapes delivered so far (each compiles a step
    once); empty for a fixed-size model (one shape)."""
    return list(self._batch_shapes)

  def _global(self, batch):
    pos = {r: i for i, r in enumerate(self.rows)}
    def make(key):
      local = batch[key]
      def cb(index):
        rows = range(*index[0].indices(self.batch_size))
        return local[[pos[r] for r in rows]][(slice(None),) + tuple(index[1:])]
      return jax.make_array_from_callback((self.batch_size,) + local.shape[1:],
                                          self._shardings[key], cb)
    return {k: make(k) for k in batch}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._finished:
      raise StopIteration
    prefetch = int(self.config.data.prefetch)
    if prefetch > 0:
      if self._thread is None:
        self._queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=DataIterator._produce, daemon=True,
            args=(weakref.ref(self), dict(self.cursors), collections.Counter(self._stats),
                  self._queue, self._stop))
        self._thread.start()
        _LIVE.add(self)
      item = self._queue.get()
      if isinstance(item, Exception):
        raise item
      batch, cursors, stats, done = item
    else:
      batch, cursors, drops, done = self._next_local(self.cursors)
      stats = collections.Counter(self._stats)
      stats.update(drops)
    self.cursors, self._stats = cursors, stats
    self._check_sources()
    if self._all_done(done):
      self._finished = True
      self._close_thread()
      self._close_grain()
      raise StopIteration
    batch = self._bucket(batch)
    if self.buckets is not None:
      shape = (self.batch_size,) + batch['images'].shape[1:]
      if shape not in self._batch_shapes:
        self._batch_shapes.append(shape)
    return self._global(batch)

  def next_local(self) -> dict[str, np.ndarray]:
    """This process's rows of the next batch as numpy (no prefetch thread, no device put)."""
    batch, self.cursors, drops, _ = self._next_local(self.cursors)
    self._stats.update(drops)
    self._check_sources()
    return self._bucket(batch, agree=False)

  # --- state ---------------------------------------------------------------------------------

  @property
  def stats(self) -> dict[str, int]:
    """Samples this process dropped so far (of the delivered batches), by reason."""
    return {k: v for k, v in self._stats.items() if not k.startswith((TAKEN, DROPPED))}

  @property
  def mixture_counts(self) -> dict[str, int]:
    """With a mixture: samples this process took from each source so far (of the delivered
    batches), every source named; else empty."""
    if self.mixture is None:
      return {}
    return {name: self._stats.get(TAKEN + name, 0) for name in self.mixture.names}

  @property
  def mixture_drops(self) -> dict[str, int]:
    """With a mixture: samples of each source this process dropped so far; else empty."""
    if self.mixture is None:
      return {}
    return {name: self._stats.get(DROPPED + name, 0) for name in self.mixture.names}

  def _check_sources(self):
    """A source of positive weight of which only dropped samples were seen, more of them
    than it holds (+ 100), has no usable sample: an error naming its key."""
    if self.mixture is None:
      return
    for i, (name, size) in enumerate(zip(self.mixture.names, self.mixture.sizes)):
      dropped = self._stats.get(DROPPED + name, 0)
      if dropped > size + 100 and not self._stats.get(TAKEN + name):
        raise ValueError(
            f'config.data.mixture[{i}] ({name}): no usable sample ({dropped} dropped, none '
            f'taken; all sources\' drops by reason: {self.stats}); check data.seq_len, '
            'data.template, data.max_images and the tokenizer against this source '
            '(python -m lvm.data.inspect), or set its weight to 0.')

  def _close_thread(self):
    if self._thread is not None:
      self._stop.set()
      if self._thread is not threading.current_thread():
        self._thread.join()
      self._thread = None

  def get_state(self) -> dict[str, Any]:
    cursors = np.full((self.batch_size,), -1, np.int64)
    for r, c in self.cursors.items():
      cursors[r] = c
    stats = dict(self._stats)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      cursors = np.max(multihost_utils.process_allgather(cursors), axis=0)
    return {'version': STATE_VERSION, 'split': self.split, 'seed': self.seed,
            'shuffle': self.shuffle, 'num_examples': self.size, 'batch_size': self.batch_size,
            'cursors': [int(c) for c in cursors], 'stats': stats,
            'packing': bool(self.packer), 'grouping': bool(self.grouping),
            **({'mixture': self._mixture_key()} if self.mixture is not None else {})}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state()`; the batch size, seed and split size must match."""
    mine = self._mixture_key() if self.mixture is not None else None
    if state.get('mixture') != mine:
      raise ValueError(f'Data iterator state has mixture={state.get("mixture")!r} but this run '
                       f'has {mine!r} (data.mixture); the stream cannot be resumed exactly.')
    for key, mine in (('batch_size', self.batch_size), ('seed', self.seed),
                      ('num_examples', self.size), ('shuffle', self.shuffle)):
      if state.get(key) != mine:
        raise ValueError(f'Data iterator state has {key}={state.get(key)!r} but this run has '
                         f'{mine!r}; the stream cannot be resumed exactly.')
    for key, mine in (('packing', bool(self.packer)), ('grouping', bool(self.grouping))):
      if state.get(key, False) != mine:  # states saved before these keys had neither
        raise ValueError(f'Data iterator state has {key}={state.get(key, False)!r} but this '
                         f'run has {mine!r} (data.packing / data.group_by_modality_length); '
                         'the stream cannot be resumed exactly.')
    self._close_thread()
    self._close_grain()
    self._finished = False
    self.cursors = {r: int(state['cursors'][r]) for r in self.rows}
    self._stats = collections.Counter(state.get('stats', {}))

  def _mixture_key(self):
    """What the stream of a mixture depends on: its sources' names, weights and sizes."""
    m = self.mixture
    return [[n, s.weight, size] for n, s, size in zip(m.names, m.sources, m.sizes)]

  def close(self):
    self._close_thread()
    self._close_grain()
    if self.features is not None:
      self.features.close()
    if self._pool:
      self._pool.shutdown()

  def __del__(self):
    try:
      self._close_thread()
      self._close_grain()
    except Exception:  # pylint: disable=broad-except
      pass


def make_iterator(config, split, mesh, *, shuffle=True, num_epochs=None) -> DataIterator:
  """The iterator over `split` (a TFDS split name) of the prepared `config.data.dataset`."""
  return DataIterator(config, split, mesh, shuffle=shuffle, num_epochs=num_epochs)
