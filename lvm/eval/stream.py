"""Bounded-memory streaming for the benchmark harness: batches prepared ahead in threads.

`prefetch_map(fn, items, num_workers, depth)` yields `fn(item)` for each item, in order,
while up to `depth` later items are being prepared by `num_workers` threads (image decode
and resize release the GIL, as in the training pipeline `lvm.data.pipeline`). At most
`depth` prepared batches exist at a time, so the pixels held never depend on how many
questions a benchmark has; `lvm.evaluate` prepares each batch's images with it and frees
them once the batch is answered.

`peak_rss_mb()` is the process's resident-set high-water mark, which
`benchmarks/eval_memory.py` reads.
"""

import collections
import concurrent.futures
import resource
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar('T')
R = TypeVar('R')


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], num_workers: int = 4,
                 depth: int = 4) -> Iterator[R]:
  """`map(fn, items)` in order, with up to `depth` results prepared ahead in threads.

  Args:
    fn: prepares one item (e.g. decodes one batch's images).
    items: consumed lazily, never more than `depth` ahead of what was yielded.
    num_workers: threads; 0 runs `fn` inline (no prefetch).
    depth: the most items submitted and not yet yielded (>= 1).

  Yields:
    fn(item) for each item; an exception raised by `fn` is raised here, in order.
  """
  if num_workers <= 0:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers, 'eval-prefetch') as pool:
    pending = collections.deque()
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max(depth, 1):
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:  # an abandoned or failed stream: do not wait for work nobody will read
      for f in pending:
        f.cancel()


def peak_rss_mb() -> float:
  """This process's peak resident set size so far, in MiB (Linux: KiB units; macOS: bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def rss_mb() -> float:
  """This process's current resident set size in MiB (Linux /proc; else the peak)."""
  try:
    with open('/proc/self/statm') as f:
      pages = int(f.read().split()[1])
  except OSError:
    return peak_rss_mb()
  return pages * resource.getpagesize() / 2 ** 20
