"""Packing and length grouping in the input pipeline: layout, determinism, exact resume,
every record once, and config errors naming their keys."""

import json

import jax
import numpy as np
import pytest

from lvm import sharding
from lvm import validate
from lvm.data import length_groups
from lvm.data import packing
from lvm.data import pipeline
from tests.data.conftest import make_iterator
from tests.data.conftest import take_batches
from tests.data.conftest import tiny_shapes_config

IMAGE, PAD = 510, 511


def test_packed_rows(shapes_dir):
  it = make_iterator(shapes_dir, seq_len=256, packing=True, pack_max_images=4)
  batch = take_batches(it, 1)[0]
  assert batch['images'].shape == (8, 4, 32, 32, 3)
  for r in range(8):
    row = {k: v[r] for k, v in batch.items()}
    segments = packing.segments_of(row)
    assert len(segments) == 3  # ~84-token samples, 3 to a 256-token row
    assert segments[0].start == 0 and all(a.stop == b.start for a, b in zip(segments, segments[1:]))
    for s in segments:
      np.testing.assert_array_equal(row['positions'][s], np.arange(s.stop - s.start))
      assert row['input_ids'][s][0] == 1 and not row['loss_mask'][s][0]  # BOS, unscored
      assert row['loss_mask'][s].sum() >= 2
    real = segments[-1].stop
    assert row['attention_mask'][:real].all() and not row['attention_mask'][real:].any()
    assert (row['input_ids'][real:] == PAD).all() and (row['segment_ids'][real:] == 0).all()
    used = int((row['input_ids'] == IMAGE).sum()) // 16
    assert used == 3 and np.abs(row['images'][:used]).sum(axis=(1, 2, 3)).min() > 0
    assert not row['images'][used:].any()  # unused slots stay zero


def test_packing_fills_slots_before_tokens(shapes_dir):
  """With one image slot a row takes one (image) sample: the slots bound the packing too."""
  it = make_iterator(shapes_dir, seq_len=256, packing=True, pack_max_images=1)
  batch = take_batches(it, 1)[0]
  assert batch['images'].shape[1] == 1 and (batch['segment_ids'].max(axis=1) == 1).all()


def test_packed_stream_is_deterministic_and_resumes(shapes_dir):
  kw = dict(seq_len=256, packing=True, pack_max_images=4, prefetch=2, num_workers=2)
  it = make_iterator(shapes_dir, **kw)
  first = take_batches(it, 3)  # 96 records, 24 a batch: the 5th batch is in the second epoch
  state = json.loads(json.dumps(it.get_state()))
  rest = take_batches(it, 3)
  again = take_batches(make_iterator(shapes_dir, **kw), 3)
  resumed = take_batches(make_iterator(shapes_dir, state, **kw), 3)
  for a, b in zip(first + rest, again + resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  unpacked = make_iterator(shapes_dir, seq_len=256)
  with pytest.raises(ValueError, match='packing'):
    unpacked.set_state(state)


def test_one_packed_epoch_holds_every_record_once(shapes_dir):
  config = tiny_shapes_config(shapes_dir, seq_len=256, packing=True, pack_max_images=4)
  it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh), num_epochs=1)
  samples = []
  for batch in it:
    b = jax.tree.map(np.asarray, batch)
    for r in range(len(b['input_ids'])):
      row = {k: v[r] for k, v in b.items()}
      samples += [tuple(row['input_ids'][s]) for s in packing.segments_of(row)]
  src = pipeline.data_source(config, 'train')
  want = sorted(tuple(it.processor.text(src[i])[0]) for i in range(len(src)))
  assert sorted(samples) == want and it.stats == {}


def _problems(**data):
  config = tiny_shapes_config('/nonexistent', **data)
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, num_devices=8)
  return str(e.value)


def test_config_errors_name_the_key():
  assert 'data.pack_max_images' in _problems(packing=True, max_images=2, pack_max_images=1)
  assert 'data.group_by_modality_length' in _problems(packing=True,
                                                      group_by_modality_length=True)
  assert 'data.pack_max_images' in _problems(packing=True, pack_max_images=-1)


def test_modality_length_groups():
  rng = np.random.default_rng(0)
  lengths = np.concatenate([rng.integers(1, 500, 70), -rng.integers(1, 500, 45)])
  order = length_groups.modality_grouped_indices(lengths, 8, np.random.default_rng([0, 0]))
  assert sorted(order) == list(range(len(lengths)))  # a permutation
  batches = [order[i:i + 8] for i in range(0, len(order) - 16, 8)]  # the full megabatches
  for batch in batches:  # one modality each, longest first
    assert len(set(np.sign(lengths[batch]))) == 1
    assert (np.diff(np.abs(lengths[batch])) <= 0).all()
  # The two partial megabatches come last, merged, in index order.
  np.testing.assert_array_equal(order[-11:], np.sort(order[-11:]))
  again = length_groups.modality_grouped_indices(lengths, 8, np.random.default_rng([0, 0]))
  other = length_groups.modality_grouped_indices(lengths, 8, np.random.default_rng([0, 1]))
  np.testing.assert_array_equal(order, again)
  assert not np.array_equal(order, other)


def test_grouped_stream_resumes_and_groups(shapes_dir):
  kw = dict(group_by_modality_length=True)
  it = make_iterator(shapes_dir, **kw)
  first = take_batches(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  rest = take_batches(it, 12)  # into the second epoch
  resumed = take_batches(make_iterator(shapes_dir, state, **kw), 12)
  for a, b in zip(rest, resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Each batch is one megabatch of the grouped order: longest (LLaVA's words) first.
  grouping = it.grouping
  order = grouping.order(0, 0, 8)
  src = pipeline.data_source(it.config, 'train')
  words = [length_groups.sample_length(src[int(i)], it.processor) for i in order[:16]]
  assert words[:8] == sorted(words[:8], reverse=True)
  got = [tuple(r) for r in first[0]['input_ids']]
  want = [tuple(it.processor(src[int(i)])['input_ids']) for i in order[:8]]
  assert got == want


def test_llava15_stages_as_its_scripts():
  """Stage 1 resizes + center-crops (no image_aspect_ratio), stage 2 pads and groups by
  modality length; packing=1 packs instead of grouping."""
  from configs import llava15  # pylint: disable=g-import-not-at-top
  stage1 = llava15.get_config('size=7b,stage=pretrain')
  stage2 = llava15.get_config('size=7b,stage=finetune')
  packed = llava15.get_config('size=7b,stage=finetune,packing=1')
  assert (stage1.data.image_aspect, stage1.data.group_by_modality_length) == ('resize', False)
  assert (stage2.data.image_aspect, stage2.data.group_by_modality_length) == ('pad', True)
  assert packed.data.packing and not packed.data.group_by_modality_length
  for c, lr, batch in ((stage1, 1e-3, 256), (stage2, 2e-5, 128)):
    assert (c.optimizer.lr, c.train.batch_size, c.data.seq_len, c.train.num_epochs) == (
        lr, batch, 2048, 1.0)
    assert (c.optimizer.schedule, c.optimizer.warmup_ratio, c.optimizer.weight_decay) == (
        'cosine', 0.03, 0.0)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.eps, c.optimizer.clip_norm) == (
        0.9, 0.999, 1e-8, 1.0)  # transformers' Trainer defaults, which LLaVA keeps
