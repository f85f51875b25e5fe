"""`data.loader='grain'` (lvm.data.grain_rows): rows filled in grain worker processes give the
'threads' loader's batches bit for bit (unpacked to the end of an epoch, packed with a
mixture), resume exactly from a saved state, carry the counted drops, and a bad loader is
refused naming its key."""

import json

import pytest

from lvm import data
from lvm import validate
from tests.data.conftest import assert_same_batches
from tests.data.conftest import make_iterator
from tests.data.conftest import take_batches
from tests.data.conftest import tiny_shapes_config

MIX = ({'dataset': 'shapes', 'weight': 3},
       {'dataset': 'shapes', 'weight': 1, 'name': 'small', 'shapes.train': 16,
        'shapes.seed': 1, 'shapes.validation': 8, 'shapes.test': 8})
PACKED = dict(seq_len=256, packing=True, pack_max_images=4)


def test_grain_gives_the_threads_batches_to_the_end_of_an_epoch(shapes_dir):
  # 8 rows over 3 worker processes: each worker fills 3 slots a batch, one a padding slot.
  kw = dict(num_workers=3, prefetch=2)
  want = take_batches(make_iterator(shapes_dir, num_epochs=1, **kw))
  it = make_iterator(shapes_dir, num_epochs=1, loader='grain', **kw)
  got = take_batches(it)
  assert len(want) == 12  # 96 records, 8 rows
  assert_same_batches(want, got)
  assert it.stats == {} and it.get_state()['cursors'] == [12] * 8


def test_grain_packed_mixture_equals_threads_and_resumes_exactly(shapes_dir):
  data.prepare(tiny_shapes_config(shapes_dir, mixture=MIX))
  kw = dict(PACKED, mixture=MIX, num_workers=2, prefetch=0)
  threads = make_iterator(shapes_dir, **kw)
  want = take_batches(threads, 4)
  it = make_iterator(shapes_dir, loader='grain', **kw)
  first = take_batches(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert_same_batches(want, first + take_batches(it, 2))
  assert it.mixture_counts == threads.mixture_counts and it.stats == threads.stats
  assert sum(it.mixture_counts.values()) > 32  # packed: more samples than rows
  it.close()
  resumed = make_iterator(shapes_dir, state, loader='grain', **kw)
  assert_same_batches(want[2:], take_batches(resumed, 2))
  assert resumed.mixture_counts == threads.mixture_counts
  resumed.close()


def test_grain_workers_raise_the_unusable_split_error(shapes_dir):
  # At seq_len 40 no vicuna_v1 sample fits its image tokens: every one is dropped and counted
  # in the worker, and the error reaches the trainer's process.
  it = make_iterator(shapes_dir, seq_len=40, loader='grain', num_workers=2)
  with pytest.raises(Exception, match='image_tokens_do_not_fit'):
    next(it)
  it.close()


def test_a_bad_loader_is_refused_naming_the_key():
  config = tiny_shapes_config('/nonexistent', loader='processes')
  with pytest.raises(ValueError, match=r"config\.data\.loader: must be one of \('threads', "
                     r"'grain'\), got 'processes'"):
    validate.validate_config(config, num_devices=8)
