"""Weighted mixtures: the training stream drawn from several datasets by weight.

`config.data.mixture` is a tuple of sources, each a dict:

    config.data.mixture = (
        {'dataset': 'llava_json', 'weight': 3},                       # config.data's own
        {'dataset': 'llava_json', 'weight': 1, 'manual_dir': '/data/mine',
         'llava_json.json_files': 'a.json,b.json'},
        {'dataset': 'shapes', 'weight': 0.5, 'shapes.train': 2000},
    )

  dataset: a registered dataset kind (`lvm.registry.DATASET`);
  weight: a number >= 0 (the weights need not sum to 1; zero leaves a source out);
  name: optional, the source's name in metrics (default: `dataset`, or `dataset<i>` where
    two sources share a kind);
  every other key overrides a `config.data` key for this source only: `data_dir`,
    `manual_dir`, `train_split`, or a field of a dataset's own group (`'shapes.train'`, or
    nested: `'shapes': {'train': 2000}`).
A source is thus `config.data` with a few keys changed, read by its dataset's own builder,
with its own prepare-time filters and reports. Everything that shapes a row (template,
tokenizer, seq_len, images, packing) is shared: it stays `config.data`'s.

The mixture replaces the training split (`data.train_split`) only; evaluation and test read
`config.data.dataset` as without a mixture, whose tokenizer the run uses too.

Sampling. Position p of the global stream (the pipeline's positions: row r reads r, r + B,
r + 2B, ...) comes from source `s(p)`, drawn independently with probability weight / total
from a generator seeded by (`data.shuffle_seed`, p // BLOCK): a pure function of the seed
and the position, so the pipeline's guarantees (process-count independence, exact resume)
hold unchanged, and the realised proportions are binomial around the weights. The q-th
position given to source s reads its q-th sample: epoch q // n_s of that source, shuffled
by (`shuffle_seed`, source index, epoch). So each source has epochs of its own, and a small
source is repeated as often as its weight demands (a source of n_s samples with share f of
the stream passes over its data f * total / n_s times per `total` samples drawn).
"""

import copy
import dataclasses
import math
import threading

import numpy as np

from lvm import registry

BLOCK = 4096  # positions drawn per generator call; the draws do not depend on it being read
_OWN_KEYS = ('dataset', 'weight', 'name')
_SHARED_DATA_KEYS = ('data_dir', 'manual_dir', 'train_split')


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of a mixture: its name, weight and full config (`config.data` overridden)."""
  name: str
  weight: float
  config: object


def _flat(entry: dict, prefix='') -> dict:
  out = {}
  for key, value in entry.items():
    if isinstance(value, dict) and prefix + key not in _OWN_KEYS:
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _key(i: int, field: str = '') -> str:
  return f'data.mixture[{i}]' + (f'.{field}' if field else '')


def _override_problem(config, key: str) -> str | None:
  """Why `key` cannot be overridden per source, or None if it can."""
  if key in _SHARED_DATA_KEYS:
    return None
  group, _, field = key.partition('.')
  groups = [k.name for k in registry.DATASET.kinds() if k.defaults is not None]
  if group in groups and field:
    if field not in config.data[group]:
      return f'config.data.{group} has no field {field!r} (it has {sorted(config.data[group])})'
    return None
  if key in config.data:
    return (f'config.data.{key} is shared by every source (it shapes the rows); only '
            f'{list(_SHARED_DATA_KEYS)} and dataset groups ({groups}) differ per source')
  return (f'unknown key (a source has {list(_OWN_KEYS)}, {list(_SHARED_DATA_KEYS)} and '
          f'dataset group fields such as {groups[0]}.FIELD)')


def check_config(config, problems: registry.Problems) -> None:
  """The mixture's problems (`lvm.validate` calls it); nothing when there is no mixture."""
  mixture = config.data.get('mixture')
  if not mixture:
    return
  if not isinstance(mixture, (tuple, list)) or not all(isinstance(e, dict) for e in mixture):
    problems.add('data.mixture', f'must be a tuple of dicts, got {mixture!r}',
                 "e.g. ({'dataset': 'shapes', 'weight': 1}, {'dataset': 'llava_json', "
                 "'weight': 2, 'manual_dir': '/data/x'})")
    return
  if config.data.get('group_by_modality_length'):
    problems.add('data.group_by_modality_length',
                 "orders one dataset's epochs; a mixture interleaves several",
                 'turn off data.group_by_modality_length (data.packing cuts padding instead)')
  total, names, bad_weight = 0.0, {}, False
  for i, entry in enumerate(mixture):
    flat = _flat(entry)
    before = len(problems.lines)
    kind = flat.get('dataset')
    known = isinstance(kind, str) and kind in registry.DATASET
    if not known:
      problems.add(_key(i, 'dataset'), f'{kind!r} is not a registered dataset',
                   f'use one of {list(registry.DATASET.names())}')
    weight = flat.get('weight')
    if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
        or not math.isfinite(weight) or weight < 0):
      problems.add(_key(i, 'weight'), f'must be a finite number >= 0, got {weight!r}',
                   'give each source a relative weight such as 1 or 0.25')
      bad_weight = True
    else:
      total += weight
    for key in flat:
      why = None if key in _OWN_KEYS else _override_problem(config, key)
      if why:
        problems.add(_key(i, key), why, 'remove it, or set it on config.data for all sources')
    check = registry.DATASET.get(kind).check if known else None
    if check is not None and len(problems.lines) == before:  # the source's own fields
      own = registry.Problems()
      check(_source_config(config, flat), own)
      problems.lines += [line.replace('config.', f'config.{_key(i)}: config.', 1)
                         for line in own.lines]
    name = source_name(mixture, i)
    if name in names:
      problems.add(_key(i, 'name'), f'{name!r} is also the name of data.mixture[{names[name]}]',
                   "give the sources distinct 'name's")
    names[name] = i
  if total <= 0 and not bad_weight:
    problems.add('data.mixture', 'the weights sum to zero: no source would be read',
                 'give at least one source a positive weight')


def source_name(mixture, i: int) -> str:
  entry = mixture[i]
  if entry.get('name'):
    return str(entry['name'])
  kind = entry.get('dataset')
  same = [e.get('dataset') for e in mixture if not e.get('name')].count(kind)
  return str(kind) if same == 1 else f'{kind}{i}'


def _source_config(config, flat: dict):
  source = copy.deepcopy(config)
  with source.ignore_type():
    source.data.mixture = ()
    source.data.dataset = flat['dataset']
    for key, value in flat.items():
      if key in _OWN_KEYS:
        continue
      *groups, last = key.split('.')
      node = source.data
      for g in groups:
        node = node[g]
      node[last] = value
  return source


def sources(config) -> list[Source]:
  """The mixture's sources, in config order (an empty list when there is no mixture)."""
  mixture = config.data.get('mixture') or ()
  return [Source(source_name(mixture, i), float(entry['weight']),
                 _source_config(config, _flat(entry)))
          for i, entry in enumerate(mixture)]


def prepare(config) -> None:
  """Builds every source's dataset (each into its own `data_dir`) unless already built.

  Raises:
    ValueError: naming the source's key, when its dataset cannot be built (e.g. no sample
      is left after the dataset's filters: TFDS refuses an empty split).
  """
  for i, s in enumerate(sources(config)):
    try:
      registry.DATASET.get(s.config.data.dataset).obj.prepare(s.config)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'config.{_key(i)} ({s.name}): dataset {s.config.data.dataset!r} could '
                       f'not be prepared: {type(e).__name__}: {e}') from e


def applies(config, split: str) -> bool:
  """Whether `split` of `config` is read from the mixture (the training split, with one)."""
  return bool(config.data.get('mixture')) and split == config.data.train_split


class Mixture:
  """The mixed stream: position -> (source index, record). See the module doc."""

  def __init__(self, config, shuffle: bool = True):
    from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
    self.sources = sources(config)
    self.names = [s.name for s in self.sources]
    self.data = []
    for i, s in enumerate(self.sources):
      split = s.config.data.train_split
      try:
        data = pipeline.data_source(s.config, split)
      except (FileNotFoundError, KeyError, ValueError) as e:
        raise ValueError(f'config.{_key(i)} ({s.name}): split {split!r} cannot be read: {e}'
                         ) from e
      if len(data) == 0 and s.weight > 0:
        raise ValueError(f'config.{_key(i)} ({s.name}): split {split!r} is empty after '
                         'filtering; fix its data or set its weight to 0.')
      self.data.append(data)
    self.sizes = [len(d) for d in self.data]
    self.size = sum(self.sizes)  # one "epoch" of the mixture: as many samples as it holds
    self.seed, self.shuffle = int(config.data.shuffle_seed), bool(shuffle)
    weights = np.array([s.weight for s in self.sources], np.float64)
    cumulative = np.cumsum(weights)
    self.cdf = cumulative / cumulative[-1]
    # Exactly 1 from the last positive weight on: no draw u < 1 reaches a later weight 0.
    self.cdf[cumulative >= cumulative[-1]] = 1.0
    self._lock = threading.Lock()
    self._starts = [np.zeros(len(self.sources), np.int64)]  # counts before each block
    self._blocks = {}  # block -> (source of each position, its rank within its source)
    self._perms = {}

  # Picklable for grain's worker processes (data.loader='grain'): the sources are reopened
  # there from their configs (a TFDS source pickled by value would bring its builder class,
  # which TFDS would register again).
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_lock', 'data')}

  def __setstate__(self, state):
    from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self.data = [pipeline.data_source(s.config, s.config.data.train_split)
                 for s in self.sources]

  @property
  def weights(self) -> np.ndarray:
    """The target fraction of each source."""
    return np.diff(self.cdf, prepend=0.0)

  def _draw(self, block: int) -> np.ndarray:
    u = np.random.default_rng([self.seed, 0x6D6978, block]).random(BLOCK)
    return np.searchsorted(self.cdf, u, side='right').astype(np.int64)

  def _block(self, block: int):
    """(source int[BLOCK], rank within the source from the block start int[BLOCK])."""
    if block not in self._blocks:
      ids = self._draw(block)
      rank = np.zeros(BLOCK, np.int64)
      for s in range(len(self.sources)):
        at = ids == s
        rank[at] = np.arange(int(at.sum()))
      if len(self._blocks) >= 16:
        self._blocks.pop(next(iter(self._blocks)))
      self._blocks[block] = (ids, rank)
    return self._blocks[block]

  def _start(self, block: int) -> np.ndarray:
    """Positions given to each source before `block` (grown block by block, kept)."""
    while len(self._starts) <= block:
      b = len(self._starts) - 1
      counts = np.bincount(self._draw(b), minlength=len(self.sources))
      self._starts.append(self._starts[-1] + counts)
    return self._starts[block]

  def locate(self, position: int) -> tuple[int, int]:
    """(source, q): the stream position's source, and its place in that source's stream."""
    block, i = divmod(int(position), BLOCK)
    with self._lock:
      ids, rank = self._block(block)
      s = int(ids[i])
      return s, int(self._start(block)[s] + rank[i])

  def _index(self, s: int, q: int) -> int:
    epoch, i = divmod(q, self.sizes[s])
    if not self.shuffle:
      return i
    with self._lock:
      if (s, epoch) not in self._perms:
        if len(self._perms) >= 4 * len(self.sources):
          self._perms.pop(next(iter(self._perms)))
        self._perms[s, epoch] = np.random.default_rng(
            [self.seed, 0x6D6978, s, epoch]).permutation(self.sizes[s])
      return int(self._perms[s, epoch][i])

  def record(self, position: int):
    """(source index, record) of a stream position."""
    s, q = self.locate(position)
    return s, self.data[s][self._index(s, q)]

  def sample_sources(self, num: int) -> np.ndarray:
    """The sources of the stream's first `num` positions (for summaries and tests)."""
    blocks = [self._draw(b) for b in range(-(-num // BLOCK))]
    return np.concatenate(blocks)[:num] if blocks else np.zeros((0,), np.int64)


def summary(config, num: int = 100_000) -> list[str]:
  """Lines about a prepared mixture: each source's records, weight and realised share of
  the first `num` positions of the stream (what `python -m lvm.data` prints)."""
  mix = Mixture(config)
  counts = np.bincount(mix.sample_sources(num), minlength=len(mix.sources))
  lines = [f'mixture of {len(mix.sources)} sources, {mix.size} records (share: target, and '
           f'realised over the first {num} samples of the stream):']
  for s, (name, n, w, c) in enumerate(zip(mix.names, mix.sizes, mix.weights, counts)):
    epochs = c / n if n else 0.0
    lines.append(f'  [{s}] {name}: {n} records, share {w:.4f} target, {c / num:.4f} realised '
                 f'({epochs:.2f} epochs of it per {num} samples)')
  return lines
