"""The input pipeline: batches, determinism, exact resume, epochs, drops, 2-process sharding."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lvm import sharding
from lvm.data import pipeline
from tests.data.conftest import assert_same_batches
from tests.data.conftest import take_batches
from tests.data.conftest import tiny_shapes_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mesh_for(config):
  return sharding.make_mesh(config.mesh)


def test_batch_layout(shapes_dir):
  config = tiny_shapes_config(shapes_dir)
  it = pipeline.make_iterator(config, 'train', mesh_for(config))
  batch = next(it)
  assert batch['images'].shape == (8, 1, 32, 32, 3) and batch['images'].dtype == np.float32
  for k in ('input_ids', 'loss_mask', 'attention_mask'):
    assert batch[k].shape == (8, 64)
    assert batch[k].sharding.spec[0] == ('data', 'fsdp')
  assert len(batch['input_ids'].sharding.device_set) == 8
  b = jax.tree.map(np.asarray, batch)
  assert (b['loss_mask'] <= b['attention_mask']).all()
  assert (b['input_ids'][~b['attention_mask']] == 511).all()
  assert ((b['input_ids'] == 510).sum(1) == 16).all()  # 16 image tokens per sample
  assert (b['loss_mask'].sum(1) >= 2).all()
  assert (b['input_ids'][:, 0] == 1).all()  # BOS
  # Normalized pixels: the white-ish background maps to about (1 - mean) / std.
  assert 1.5 < b['images'].max() < 2.2 and b['images'].min() < 0


def test_deterministic_and_seeded(shapes_dir):
  config = tiny_shapes_config(shapes_dir)
  mesh = mesh_for(config)
  a = take_batches(pipeline.make_iterator(config, 'train', mesh), 3)
  b = take_batches(pipeline.make_iterator(config, 'train', mesh), 3)
  assert_same_batches(a, b)
  config.data.shuffle_seed = 1
  c = take_batches(pipeline.make_iterator(config, 'train', mesh), 1)
  assert not np.array_equal(a[0]['input_ids'], c[0]['input_ids'])


@pytest.mark.parametrize('prefetch,workers', [(0, 0), (2, 2)])
def test_resume_continues_the_same_stream(shapes_dir, prefetch, workers):
  config = tiny_shapes_config(shapes_dir, prefetch=prefetch, num_workers=workers)
  mesh = mesh_for(config)
  # 96 records / 8 rows: 12 batches an epoch, so 16 batches cross into a second epoch.
  it = pipeline.make_iterator(config, 'train', mesh)
  first = take_batches(it, 10)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  rest = take_batches(it, 6)
  resumed = pipeline.make_iterator(config, 'train', mesh)
  resumed.set_state(state)
  assert_same_batches(take_batches(resumed, 6), rest)
  # Batches differ from each other (the stream moves on) and the epochs reshuffle.
  assert not np.array_equal(first[0]['input_ids'], first[1]['input_ids'])
  assert not np.array_equal(first[0]['input_ids'], rest[2]['input_ids'])
  bad = dict(state, batch_size=16)
  with pytest.raises(ValueError, match='batch_size'):
    resumed.set_state(bad)


def test_one_epoch_sees_every_record_once(shapes_dir):
  config = tiny_shapes_config(shapes_dir)
  mesh = mesh_for(config)
  it = pipeline.make_iterator(config, 'validation', mesh, shuffle=False, num_epochs=1)
  rows = []
  for batch in it:
    b = jax.tree.map(np.asarray, batch)
    rows += [tuple(ids) for ids, att in zip(b['input_ids'], b['attention_mask']) if att.any()]
  src = pipeline.data_source(config, 'validation')
  proc = pipeline.Processor(config, it.processor.tokenizer, 16)
  want = sorted(tuple(proc(src[i])['input_ids']) for i in range(len(src)))
  assert sorted(rows) == want and len(rows) == 24
  with pytest.raises(StopIteration):
    next(it)


def test_drops_are_counted_and_truncation_keeps_images(shapes_dir):
  # vicuna_v1 puts the image after a ~30-token system prompt: at seq_len 40 its 16 image
  # tokens cannot fit, so every sample is dropped and the iterator says so.
  config = tiny_shapes_config(shapes_dir, seq_len=40)
  with pytest.raises(ValueError, match='image_tokens_do_not_fit'):
    next(pipeline.make_iterator(config, 'train', mesh_for(config)))
  # plain: <s> + 16 image tokens + caption; at seq_len 24 long captions are truncated.
  config = tiny_shapes_config(shapes_dir, seq_len=24, template='plain')
  it = pipeline.make_iterator(config, 'train', mesh_for(config))
  b = jax.tree.map(np.asarray, next(it))
  assert ((b['input_ids'] == 510).sum(1) == 16).all()
  assert b['attention_mask'].all()  # every caption is longer than 7 tokens: truncated
  assert (b['loss_mask'][:, 17:]).all() and not b['loss_mask'][:, :17].any()
  assert it.stats == {}


WORKER = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    port, pid, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from lvm import sharding
    from lvm.data import pipeline
    from tests.data.conftest import tiny_shapes_config
    config = tiny_shapes_config(data_dir)
    read = []
    class Logged:
      def __init__(self, src): self.src = src
      def __len__(self): return len(self.src)
      def __getitem__(self, i): read.append(int(i)); return self.src[i]
    mesh = sharding.make_mesh(config.mesh)
    it = pipeline.DataIterator(config, 'train', mesh,
                               source=Logged(pipeline.data_source(config, 'train')))
    batches = []
    for _ in range(2):
      b = next(it)
      assert b['input_ids'].addressable_shards[0].data.shape[0] == 1
      batches.append({k: multihost_utils.process_allgather(v, tiled=True).tolist()
                      for k, v in b.items() if k != 'images'})
    state = it.get_state()
    with open(out, 'w') as f:
      json.dump({'rows': it.rows, 'read': read, 'batches': batches, 'state': state}, f)
''')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_each_read_their_slice(shapes_dir, tmp_path):
  config = tiny_shapes_config(shapes_dir)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  port = free_port()
  outs = [tmp_path / f'p{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(port), str(i), str(shapes_dir),
                             str(outs[i])], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  res = [json.load(open(o)) for o in outs]
  assert res[0]['rows'] == [0, 1, 2, 3] and res[1]['rows'] == [4, 5, 6, 7]
  # Each process read only its own rows' records; together, what one process reads.
  assert set(res[0]['read']).isdisjoint(res[1]['read'])
  it = pipeline.make_iterator(config, 'train', mesh_for(config))
  single = take_batches(it, 2)
  assert sorted(res[0]['read'] + res[1]['read']) == sorted(
      it._index(r + 8 * j) for r in range(8) for j in range(2))  # pylint: disable=protected-access
  for got, want in zip(res[0]['batches'], single):
    for k in ('input_ids', 'loss_mask', 'attention_mask'):
      np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
  assert res[0]['batches'] == res[1]['batches']
  # The gathered state is global and restores a single-process run exactly.
  assert res[0]['state'] == res[1]['state'] == it.get_state()


def test_caption_turn_and_system_prompt(shapes_dir):
  """`data.caption_prompt` adds the caption as a last, supervised turn to training samples
  only; `data.system_prompt=''` drops the system prompt everywhere."""
  from lvm import models  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(shapes_dir)
  config.data.seq_len = 160
  config.data.system_prompt = ''
  config.data.caption_prompt = 'What shapes are there?'
  tok = tokenizer.load(config)
  record = pipeline.data_source(config, 'train')[0]
  n = models.num_image_tokens(config)
  train_ids, train_mask, _ = pipeline.Processor(config, tok, n, train=True).text(record)
  eval_ids, eval_mask, _ = pipeline.Processor(config, tok, n, train=False).text(record)
  caption = pipeline._text(record['caption'])  # pylint: disable=protected-access
  assert caption
  supervised = tok.decode([int(i) for i in train_ids[train_mask]])
  assert supervised.replace('</s>', '').strip().endswith(caption)
  assert caption not in tok.decode([int(i) for i in eval_ids[eval_mask]])
  # The evaluation sample is the training sample without its last turn.
  assert train_ids[:len(eval_ids)].tolist() == eval_ids.tolist()
  assert 'chat between' not in tok.decode([int(i) for i in eval_ids if i != tok.image_token_id])
