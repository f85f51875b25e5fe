"""`data.loader='grain'`: the pipeline's rows filled in grain worker processes.

lvm's sampler keeps deciding everything about the stream: which record each row of each batch
reads (`lvm.data.pipeline`: row r reads positions r, r + B, ... of the seeded stream), what is
dropped and counted, what is packed together, which mixture source a position draws. What
grain takes over is the work: each of `data.num_workers` worker processes (grain's
`mp_prefetch`, spawned, so jax in the parent is never forked) owns every W-th local row and
fills that row batch after batch (`DataIterator._fill_row`: read the array_record record,
decode the JPEG, resize / pad / normalize, template + tokenize, pack), running ahead of the
trainer by `data.prefetch` batches. grain interleaves the workers round-robin, which gives back
the rows in order, so a batch is bit-identical to the 'threads' loader's.

grain's own checkpointable iterator state is not used: lvm's state (one cursor per row) is
already exact, process-count independent and covers packing and mixtures, while grain's
shuffles, `mix` and packing would be another stream, not reproducible bit-exactly from
lvm's. The grain iterator is started from the cursors (`start`), so `get_state` /
`set_state` are unchanged, and a restored run restarts the workers from the restored cursors.
"""

import collections
from typing import Any

from absl import flags
import grain


class RowStream(grain.IterDataset):
  """The local rows' examples, batch after batch, row after row: element i is
  (example or None, new cursor, Counter of drops) of row `rows[i % R]` of batch i // R, or
  None for a padding slot when R is not a multiple of the worker count W.

  Each worker fills its rows sequentially, so per row the order is the pipeline's.
  `filler` is the pickled `DataIterator` (its stream part only, `DataIterator.__getstate__`).
  """

  def __init__(self, filler, rows: list[int], cursors: dict[int, int]):
    super().__init__()
    self.filler, self.rows, self.cursors = filler, list(rows), dict(cursors)
    self.slice = slice(None)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's worker slicing (worker w of W gets `slice(w, None, W)`): the rows it fills."""
    del sequential_slice
    self.slice = sl

  def __iter__(self):
    return _RowIterator(self)

  def __str__(self):
    return f'RowStream(rows={len(self.rows)}, slice={self.slice})'


class _RowIterator(grain.DatasetIterator):

  def __init__(self, ds: RowStream):
    super().__init__()
    self.filler = ds.filler
    start, _, step = ds.slice.indices(len(ds.rows))
    step = step or 1
    # Every worker yields the same number of slots per batch so that grain's round-robin
    # interleave keeps the batches aligned: ceil(R / W), the missing ones as None.
    per_batch = -(-len(ds.rows) // step)
    mine = ds.rows[start::step]
    self.slots = mine + [None] * (per_batch - len(mine))
    self.cursors = {r: ds.cursors[r] for r in mine}
    self.k = 0

  def __next__(self):
    row = self.slots[self.k % len(self.slots)]
    self.k += 1
    if row is None:
      return None
    example, cursor, drops = self.filler._fill_row(row, self.cursors[row])  # pylint: disable=protected-access
    self.cursors[row] = cursor
    return example, cursor, drops

  def get_state(self) -> dict[str, Any]:
    return {'k': self.k, 'cursors': dict(self.cursors)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.k, self.cursors = state['k'], dict(state['cursors'])


class Loader:
  """Pulls the local rows of each batch from the grain workers, in row order."""

  def __init__(self, filler, rows: list[int], cursors: dict[int, int], workers: int,
               buffer: int):
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags (defaults) when it starts workers; a program that did not
      # go through absl.app (pytest, the benchmarks, a notebook) has not parsed them.
      flags.FLAGS.mark_as_parsed()
    self.rows = list(rows)
    self.workers = max(int(workers), 1)
    ds = RowStream(filler, rows, cursors)
    if workers > 0:  # `buffer` batches ahead: each worker's share of rows of that many
      per_worker = -(-len(self.rows) // self.workers)
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=max(int(buffer), 1) * per_worker))
    self.cursors = dict(cursors)
    self.iterator = iter(ds)

  def next_rows(self, cursors: dict[int, int]) -> list[tuple]:
    """[(example or None, new cursor, drops)] of the local rows starting at `cursors`."""
    if cursors != self.cursors:  # the caller owns the state: a loader only ever continues it
      raise RuntimeError(f'grain loader is at cursors {self.cursors}, asked for {cursors}')
    per_worker = -(-len(self.rows) // self.workers)
    items = [next(self.iterator) for _ in range(per_worker * self.workers)]
    results = [x for x in items if x is not None]
    assert len(results) == len(self.rows), (len(results), len(self.rows))
    self.cursors = {r: c for r, (_, c, _) in zip(self.rows, results)}
    return [(ex, c, collections.Counter(d)) for ex, c, d in results]

  def close(self):
    close = getattr(self.iterator, 'close', None)
    if close is not None:
      close()
