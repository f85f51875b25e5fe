"""A mistyped `--config.` key or a missing `--config` file (issue 27 item 5).

Real `python -m` processes of every entry point that takes --config: each must end with
ONE line naming the key (with the schema's closest key as a suggestion) or the file, exit
status 2, and no traceback.
"""

import os
import subprocess
import sys

import pytest

from lvm import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module, *args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', module, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith('Error:')]


CASES = {
    'main_mistyped_key': (
        'lvm.main', ['--config=configs/tiny.py', '--config.train.batch_sise=4'],
        'Error: Unknown config key --config.train.batch_sise (not in the config schema). '
        'Did you mean --config.train.batch_size?'),
    'main_mistyped_group': (
        'lvm.main', ['--config=configs/tiny.py', '--config.trian.num_steps=4'],
        'Error: Unknown config key --config.trian.num_steps (not in the config schema). '
        'Did you mean --config.train.num_steps?'),
    'main_missing_file': (
        'lvm.main', ['--config=configs/no_such_config.py'],
        "Error: --config=configs/no_such_config.py: cannot load the config file: [Errno 2] No "
        "such file or directory: 'configs/no_such_config.py'"),
    'inspect_mistyped_key': (
        'lvm.data.inspect', ['--config=configs/tiny.py', '--config.data.seqlen=64'],
        'Error: Unknown config key --config.data.seqlen (not in the config schema). '
        'Did you mean --config.data.seq_len?'),
    'data_missing_file': (
        'lvm.data', ['--config=configs/nope.py'],
        "Error: --config=configs/nope.py: cannot load the config file: [Errno 2] No such file "
        "or directory: 'configs/nope.py'"),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_one_line_naming_key_or_file(case, tmp_path):
  module, args, expected = CASES[case]
  workdir = tmp_path / 'run'
  extra = [f'--workdir={workdir}'] if module == 'lvm.main' else []
  proc = _run(module, *args, *extra, tmp_path=tmp_path)
  assert proc.returncode == cli.USAGE_ERROR, proc.stderr[-3000:]
  assert _error_lines(proc) == [expected], proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()  # stopped before anything was written


def test_unknown_key_suggestion_comes_from_the_schema():
  """Item 5: the suggestion is the closest key of `cli.schema()` (the `lvm.config` schema)."""
  argv = ['prog', '--config=x.py', '--config.optimizer.warmup_ratoi=0.1']
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'x', flag_values=fv)
  message = cli.unknown_config_key(argv, fv)
  assert message.startswith('Unknown config key --config.optimizer.warmup_ratoi')
  assert 'Did you mean --config.optimizer.warmup_ratio?' in message
  assert cli.unknown_config_key(['prog', '--config.optimizer.lr=1e-3'], fv) is None
  # A group typo is matched on the whole path.
  assert cli.unknown_config_key(['prog', '--config.optimzer.lr=1'], fv).endswith(
      'Did you mean --config.optimizer.lr?')
