"""config.train.eval_benchmarks: generation-based benchmark scores during training, logged
like the loss; bad entries fail validation naming the key."""

import contextlib
import json
import os
import sys

import jax
import pytest

from benchmarks import eval_memory
from lvm import hooks
from lvm import metrics
from lvm import sharding
from lvm import validate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_utils  # pylint: disable=import-error,wrong-import-position


def test_bad_benchmark_entries_are_reported_with_the_key(tmp_path):
  config = train_utils.tiny_config()
  config.train.eval_benchmarks = ('pope', 'vqa3=/x', f'pope:nosuch={tmp_path}',
                                  f'pope={tmp_path / "missing"}')
  config.train.eval_benchmark_questions = -1
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, 8)
  text = str(e.value)
  for expected in ("give the benchmark's folder as pope=DATA_DIR", "unknown benchmark 'vqa3'",
                   "pope has no split 'nosuch'", 'missing\' is not a folder',
                   'train.eval_benchmark_questions'):
    assert expected in text
  assert text.count('train.eval_benchmarks') >= 4


class _Progress:
  """Stands in for hooks.ReportProgress: evaluation time is excluded from throughput."""

  def __init__(self):
    self.excluded_steps = []

  @contextlib.contextmanager
  def excluded(self, step):
    self.excluded_steps.append(step)
    yield


def test_benchmarks_run_every_eval_every_steps_and_are_logged(tmp_path):
  """The hook as lvm.train runs it (train_and_evaluate adds it after the eval hook and runs
  it at the end): due at step 2, run at the last step, logged through the MetricWriter."""
  data = eval_memory.write_pope(str(tmp_path / 'pope'), 30, num_image_files=4)
  config = train_utils.tiny_config(**{
      'train.num_steps': 4, 'train.eval_every': 2, 'data.data_dir': str(tmp_path / 'tok'),
      'train.eval_benchmarks': (f'pope={data}',), 'train.eval_benchmark_questions': 12,
      'train.eval_benchmark_batch_size': 8, 'data.shapes.train': 96,
      'data.shapes.validation': 8, 'data.shapes.test': 8})  # a tokenizer trained in 0.03 s
  validate.validate_config(config, jax.device_count())
  from lvm.data import shapes  # pylint: disable=import-outside-toplevel
  shapes.prepare_assets(config)  # the run's tokenizer
  run = tmp_path / 'run'
  writer = metrics.MetricWriter(run)
  progress = _Progress()
  bench = hooks.Benchmarks(config, writer, sharding.make_mesh(config.mesh), 4, progress, run)
  params = eval_memory.random_params(config)
  for step in range(1, 5):
    if bench.due(step):
      bench(step, {'params': params}, {})
  results = bench.run(4, params)  # after the loop
  writer.close()
  assert progress.excluded_steps == [2]
  records = [r for r in metrics.read_jsonl(str(run)) if r['split'] == 'bench/pope']
  assert [r['step'] for r in records] == [2, 4]
  for r in records:
    assert (r['num_scored'], r['num_questions'], r['num_skipped']) == (12, 12, 0)
    assert 0 <= r['f1_mean'] <= 100 and r['questions_per_second'] > 0
  assert records[0]['f1_mean'] == records[1]['f1_mean']  # the same weights
  assert results['bench/pope']['step'] == 4
  with open(run / 'eval' / 'pope_step2' / 'score.json') as f:
    assert json.load(f)['limit'] == 12
  assert os.listdir(run / 'tensorboard')  # the same writer as the loss
