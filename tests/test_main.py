"""The command line: config flags, a short real run on `shapes`, resume, and typo errors."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'lvm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_mistyped_config_key_fails(tmp_path):
  out = _run('--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.train.nmu_steps=3',
             timeout=120)
  assert out.returncode != 0
  assert 'nmu_steps' in out.stderr
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_shapes_run_writes_outputs_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--config=configs/shapes.py:train=48,steps=3,batch_size=8',
          f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "data"}',
          '--config.data.shapes.validation=8', '--config.data.shapes.test=8',
          '--config.model.vision.depth=1', '--config.model.decoder.depth=1',
          '--config.train.log_every=1', '--config.checkpoint.interval=2']
  out = _run(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3]
  assert all(r['loss'] > 0 and 'lr' in r and 'grad_norm' in r for r in train)
  assert 'samples_per_sec' in train[-1] and 'tokens_per_sec' in train[-1]
  evals = {r['split']: r for r in records if r['split'] != 'train'}
  assert set(evals) == {'eval', 'test'}
  assert 0.0 <= evals['test']['exact_match'] <= 1.0 and evals['test']['num_answers'] > 0
  assert json.load(open(workdir / 'config.json'))['train']['num_steps'] == 3
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  assert os.listdir(workdir / 'tensorboard')
  # Running again on a finished workdir resumes at step 3: nothing more to train.
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from' in again.stdout
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3]
