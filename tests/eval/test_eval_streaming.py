"""Streaming evaluation: the prefetch keeps order and bounds what is in flight, and peak
memory does not grow with the number of questions (benchmarks/eval_memory.py, small)."""

import threading
import time

import pytest

from benchmarks import eval_memory
from lvm.eval import stream


def test_prefetch_map_keeps_order_and_bounds_work_in_flight():
  lock, state = threading.Lock(), {'started': 0, 'yielded': 0, 'ahead': 0}

  def work(i):
    with lock:
      state['started'] += 1
      state['ahead'] = max(state['ahead'], state['started'] - state['yielded'])
    time.sleep(0.001 * (i % 3))  # out-of-order completion
    return i * i

  out = []
  for x in stream.prefetch_map(work, iter(range(50)), num_workers=3, depth=4):
    out.append(x)
    with lock:
      state['yielded'] += 1
  assert out == [i * i for i in range(50)]
  assert state['ahead'] <= 4  # never more than `depth` items prepared and not consumed
  assert list(stream.prefetch_map(work, range(5), num_workers=0)) == [0, 1, 4, 9, 16]

  def fail(i):
    if i == 3:
      raise ValueError('bad item 3')
    return i
  with pytest.raises(ValueError, match='bad item 3'):
    list(stream.prefetch_map(fail, range(10), num_workers=2, depth=2))


def test_peak_memory_is_flat_in_the_number_of_questions():
  """2000 questions peak within ~20 MiB of 200 (measured 4-11 MiB), in a fresh process with glibc's per-thread
  arenas capped (their bounded creep is not the harness's); keeping each preprocessed 64 px
  image (48 KiB) as the harness did before would add 84 MiB."""
  results = eval_memory.measure_in_subprocess([200, 2000], malloc_arena_max=2, batch_size=64,
                                              max_new_tokens=1, image_size=64)
  for n, r in results.items():
    assert r['num_scored'] == r['num_questions'] == n
  held = 1800 * 64 * 64 * 3 * 4 / 2 ** 20
  growth = results[2000]['rss_peak_mb'] - results[200]['rss_peak_mb']
  assert growth < held / 4, results
