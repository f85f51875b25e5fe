"""Weighted mixtures (lvm.data.mixture): proportions, determinism, exact resume with packing,
process-slice independence, realised proportions in the metrics, and bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from lvm import data
from lvm import sharding
from lvm import validate
from lvm.data import mixture
from lvm.data import pipeline
from tests.data.conftest import assert_same_batches
from tests.data.conftest import make_iterator
from tests.data.conftest import take_batches
from tests.data.conftest import tiny_shapes_config

# A second shapes dataset (other seed, 16 records) beside the fixture's 96-record one.
SMALL = {'dataset': 'shapes', 'weight': 1, 'name': 'small', 'shapes.train': 16,
         'shapes.seed': 1, 'shapes.validation': 8, 'shapes.test': 8}
MIX = ({'dataset': 'shapes', 'weight': 3}, SMALL)
PACKED = dict(seq_len=256, packing=True, pack_max_images=4)


@pytest.fixture(scope='module')
def mix_dir(shapes_dir):
  data.prepare(tiny_shapes_config(shapes_dir, mixture=MIX))
  return shapes_dir


def _iterator(mix_dir, state=None, **kw):
  return make_iterator(mix_dir, state, **{'mixture': MIX, **kw})


def test_proportions_within_binomial_tolerance(mix_dir):
  config = tiny_shapes_config(mix_dir, mixture=(
      {'dataset': 'shapes', 'weight': 3}, dict(SMALL, weight=1.5), dict(SMALL, weight=0.0,
                                                                        name='off')))
  mix = mixture.Mixture(config)
  n = 3 * mixture.BLOCK + 123  # across block boundaries
  sources = mix.sample_sources(n)
  counts = np.bincount(sources, minlength=3)
  p = np.array([2 / 3, 1 / 3, 0.0])
  sigma = np.sqrt(n * p * (1 - p))
  assert (np.abs(counts - n * p) <= 4 * sigma).all(), (counts, n * p)
  assert counts[2] == 0  # weight 0: never read
  # locate() is the same draw, and a source's q-th position is its q-th sample: q counts the
  # source's earlier positions (block boundaries included).
  seen = np.zeros(3, np.int64)
  for position in range(n):
    s, q = mix.locate(position)
    assert (s, q) == (sources[position], seen[s])
    seen[s] += 1
  # Per-source epochs: each run of n_s consecutive samples of a source is one permutation.
  small = [mix._index(1, q) for q in range(2 * mix.sizes[1])]  # pylint: disable=protected-access
  assert sorted(small[:16]) == sorted(small[16:]) == list(range(16)) and small[:16] != small[16:]
  # Another seed, another draw.
  config.data.shuffle_seed = 1
  assert not np.array_equal(mixture.Mixture(config).sample_sources(n), sources)


@pytest.mark.parametrize('packed', [False, True])
def test_deterministic_resumes_and_counts_by_source(mix_dir, packed):
  kw = dict(PACKED if packed else {}, prefetch=2, num_workers=2)
  it = _iterator(mix_dir, **kw)
  first = take_batches(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  counts = it.mixture_counts
  rest = take_batches(it, 3)
  again = _iterator(mix_dir, **kw)
  assert_same_batches(first + rest, take_batches(again, 6))  # two instances, the same stream
  resumed = _iterator(mix_dir, state, **kw)
  assert resumed.mixture_counts == counts
  assert_same_batches(rest, take_batches(resumed, 3))
  assert resumed.mixture_counts == it.mixture_counts and it.stats == {}
  # The counts are the sources of the samples delivered: 8 rows x 6 (unpacked).
  total = sum(it.mixture_counts.values())
  assert total == 48 if not packed else total > 48
  assert 0.5 < it.mixture_counts['shapes'] / total < 0.95
  # A state of another mixture (or none) is refused.
  with pytest.raises(ValueError, match='mixture'):
    _iterator(mix_dir, state, **dict(kw, mixture=(MIX[0], dict(SMALL, weight=2))))
  plain = tiny_shapes_config(mix_dir, **kw)
  with pytest.raises(ValueError, match='mixture'):
    pipeline.make_iterator(plain, 'train', sharding.make_mesh(plain.mesh)).set_state(state)


def test_a_row_does_not_depend_on_the_other_rows(mix_dir, monkeypatch):
  """Each process reads only its rows: two halves of the rows (as two processes would hold
  them) give the rows and source counts of the whole batch."""
  whole = _iterator(mix_dir, **PACKED)
  want = [whole.next_local() for _ in range(2)]
  halves = []
  for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
    monkeypatch.setattr(pipeline, 'local_rows', lambda *a, rows=rows: rows)
    it = _iterator(mix_dir, **PACKED)
    halves.append(([it.next_local() for _ in range(2)], it.mixture_counts))
  for step in range(2):
    for k in want[step]:
      got = np.concatenate([halves[0][0][step][k], halves[1][0][step][k]])
      np.testing.assert_array_equal(got, want[step][k], err_msg=k)
  assert {n: halves[0][1][n] + halves[1][1][n] for n in halves[0][1]} == whole.mixture_counts


def _train_losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if r.get('split') == 'train':
        out[r['step']] = r
  return out


def test_training_resumes_bit_exactly_with_packing_and_mixture(mix_dir, tmp_path):
  """Losses of a run restarted from its step-2 checkpoint equal the uninterrupted run's,
  and the logged source fractions continue where they were."""
  from lvm import train  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(mix_dir, mixture=MIX, **PACKED)
  config.model.vision.depth = config.model.decoder.depth = 1
  config.train.num_steps = 4
  config.data.eval_split = config.data.test_split = ''
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  uninterrupted = _train_losses(workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # as if killed after step 2's save
  train.train_and_evaluate(config, workdir)
  resumed = _train_losses(workdir)
  assert [resumed[s]['loss'] for s in (3, 4)] == [uninterrupted[s]['loss'] for s in (3, 4)]
  last = uninterrupted[4]
  for key in ('mixture_shapes_samples', 'mixture_small_samples', 'mixture_shapes_fraction',
              'mixture_small_fraction'):
    assert resumed[4][key] == last[key], key
  assert last['mixture_shapes_fraction'] + last['mixture_small_fraction'] == pytest.approx(1)
  assert last['mixture_small_samples'] > 0


def _problems(**kw):
  config = tiny_shapes_config('/nonexistent', **kw)
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, num_devices=8)
  return str(e.value)


def test_bad_mixtures_fail_validation_naming_the_key():
  shapes = {'dataset': 'shapes', 'weight': 1}
  assert 'config.data.mixture[1].weight: must be a finite number >= 0, got -1' in _problems(
      mixture=(shapes, dict(shapes, weight=-1, name='b')))
  assert 'config.data.mixture: the weights sum to zero' in _problems(
      mixture=(dict(shapes, weight=0), dict(shapes, weight=0.0, name='b')))
  assert "config.data.mixture[0].dataset: 'coco' is not a registered dataset" in _problems(
      mixture=({'dataset': 'coco', 'weight': 1},))
  assert 'config.data.mixture[0].seq_len: config.data.seq_len is shared' in _problems(
      mixture=(dict(shapes, seq_len=128),))
  assert "config.data.mixture[0].shapes.trian: config.data.shapes has no field 'trian'" in (
      _problems(mixture=(dict(shapes, **{'shapes.trian': 5}),)))
  assert 'config.data.mixture[0]: config.data.shapes.train: must be a positive' in _problems(
      mixture=(dict(shapes, shapes={'train': 0}),))
  assert "config.data.mixture[1].name: 'shapes' is also the name" in _problems(
      mixture=(shapes, dict(shapes, name='shapes')))
  assert 'config.data.group_by_modality_length' in _problems(
      mixture=(shapes,), group_by_modality_length=True)
  assert 'config.data.mixture: must be a tuple of dicts' in _problems(mixture=('shapes',))


def test_a_source_without_usable_samples_fails_naming_its_key(shapes_dir, tmp_path):
  """A llava_json source whose every sample is filtered out at prepare time (a missing
  image) stops `prepare` with the source's key."""
  folder = tmp_path / 'broken'
  folder.mkdir()
  (folder / 'data.json').write_text(json.dumps([{
      'id': 'a', 'image': 'missing.png',
      'conversations': [{'from': 'human', 'value': '<image>\nHi'},
                        {'from': 'gpt', 'value': 'Hello'}]}]))
  config = tiny_shapes_config(shapes_dir, mixture=(
      {'dataset': 'shapes', 'weight': 1},
      {'dataset': 'llava_json', 'weight': 1, 'manual_dir': str(folder),
       'data_dir': str(tmp_path / 'tfds')}))
  validate.validate_config(config, num_devices=8)
  with pytest.raises(ValueError, match=r'config\.data\.mixture\[1\] \(llava_json\): dataset '
                     "'llava_json' could not be prepared"):
    data.prepare(config)


def test_inspect_names_each_samples_source(mix_dir):
  from lvm.data import inspect  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(mix_dir, mixture=MIX)
  mix = mixture.Mixture(config, shuffle=False)
  got = [d['source'] for d in inspect.inspect(config, 'train', 12)]
  assert got == [mix.names[mix.locate(p)[0]] for p in range(12)] and set(got) == set(mix.names)
  assert all('source' not in d for d in inspect.inspect(config, 'validation', 2))


def test_a_source_the_pipeline_drops_entirely_fails_naming_its_key(mix_dir, tmp_path):
  """Samples of two images with data.max_images=1: all dropped, counted per source, then
  an error naming the source's key (a whole epoch of it + 100 seen, none usable)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'two_images'
  folder.mkdir()
  samples = []
  for i in range(4):
    for k in range(2):
      Image.new('RGB', (8, 8), (40 * i, 80 * k, 0)).save(folder / f'{i}_{k}.png')
    samples.append({'id': str(i), 'image': [f'{i}_0.png', f'{i}_1.png'], 'conversations': [
        {'from': 'human', 'value': '<image>\n<image>\nSame colour?'},
        {'from': 'gpt', 'value': 'no'}]})
  (folder / 'data.json').write_text(json.dumps(samples))
  source = {'dataset': 'llava_json', 'weight': 1, 'name': 'pairs', 'manual_dir': str(folder),
            'data_dir': str(tmp_path / 'tfds'), 'llava_json.validation_fraction': 0.0}
  config = tiny_shapes_config(mix_dir, mixture=(MIX[0], source))
  data.prepare(config)
  it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh))
  next(it)
  assert it.mixture_drops['pairs'] > 0 and it.mixture_counts['pairs'] == 0
  assert it.mixture_drops['pairs'] == sum(it.stats.values())  # by reason, all sources
  with pytest.raises(ValueError, match=r'config\.data\.mixture\[1\] \(pairs\): no usable sample'):
    for _ in range(60):
      next(it)


WORKER = '''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from lvm import sharding
from lvm.data import pipeline
from tests.data.conftest import tiny_shapes_config
from tests.data.test_data_mixture import MIX, PACKED
config = tiny_shapes_config(data_dir, mixture=MIX, **PACKED)
it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh))
batches = [{k: multihost_utils.process_allgather(v, tiled=True).tolist()
            for k, v in next(it).items() if k != 'images'} for _ in range(2)]
state = it.get_state()
with open(out, 'w') as f:
  json.dump({'batches': batches, 'cursors': state['cursors'], 'counts': it.mixture_counts}, f)
'''


def test_two_processes_give_the_one_process_batches(mix_dir, tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=root)
  outs = [tmp_path / f'p{i}.json' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(port), str(i), str(mix_dir),
                             str(outs[i])], env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  res = [json.load(open(o)) for o in outs]
  single = _iterator(mix_dir, **PACKED)
  want = take_batches(single, 2)
  for got, batch in zip(res[0]['batches'], want):
    for k in got:
      np.testing.assert_array_equal(np.asarray(got[k]), batch[k], err_msg=k)
  assert res[0]['cursors'] == res[1]['cursors'] == single.get_state()['cursors']
  both = {n: res[0]['counts'][n] + res[1]['counts'][n] for n in single.mixture_counts}
  assert both == single.mixture_counts and min(res[0]['counts'].values()) > 0
