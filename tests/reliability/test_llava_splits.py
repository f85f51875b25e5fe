"""Evaluation splits a dataset does not have (issue 27): known before training starts.

Every run on LLaVA-format data used to end with exit status 1 after training: the default
`data.test_split='test'` names a split `llava_json` builds only from `test_files`, and
`eval_split='validation'` exists only when some sample hashes into it. A split left at its
schema default is now skipped with one line; a split named explicitly that the dataset lacks
is an error before anything is compiled.
"""

import json
import os

import pytest

from lvm import hooks
import reliability_helpers as h

# The issue's command, on the tiny model: `--config=configs/tiny.py:dataset=llava_json,
# seq_len=256 --config.data.llava_json.validation_fraction=0.3 --config.train.num_steps=3`.
# The JSON glob would take held_out.json too: name the training file.
ISSUE_FLAGS = ('--config.data.llava_json.validation_fraction=0.3',
               '--config.train.num_steps=3', '--config.data.llava_json.json_files=llava.json')
CONFIG = 'configs/tiny.py:dataset=llava_json,seq_len=256'


def _config(**data):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config('dataset=llava_json')
  for k, v in data.items():
    config.data[k] = v
  return config


def test_default_splits_absent_are_skipped_with_one_line_each():
  lines = []
  splits = hooks.eval_splits(_config(), ['train'], lines.append)
  assert splits == {'eval': '', 'test': ''}
  assert len(lines) == 2
  assert lines[0] == ("data: dataset 'llava_json' has no 'validation' split (it has: train), "
                      "so config.data.eval_split='validation' (the default) is skipped. Set "
                      'config.data.eval_split= to silence this.')
  assert 'config.data.llava_json.test_files' in lines[1]
  lines.clear()
  assert hooks.eval_splits(_config(), ['train', 'validation', 'test'], lines.append) == {
      'eval': 'validation', 'test': 'test'}
  assert not lines
  # Switched off, or an injected iterator (splits unknown): as named, no line.
  assert hooks.eval_splits(_config(eval_split='', test_split=''), ['train'], lines.append) == {
      'eval': '', 'test': ''}
  assert hooks.eval_splits(_config(), None, lines.append) == {'eval': 'validation',
                                                              'test': 'test'}
  assert not lines


@pytest.mark.parametrize('key', ['eval_split', 'test_split'])
def test_split_named_explicitly_must_exist(key):
  with pytest.raises(ValueError, match=rf"config.data.{key}='heldout' is not a split of "
                     r"dataset 'llava_json' \(it has: train, validation\)"):
    hooks.eval_splits(_config(**{key: 'heldout'}), ['train', 'validation'], print)


@pytest.fixture(scope='module')
def llava(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava_splits')
  manual = str(root / 'llava')
  h.make_llava_folder(manual)
  # A held-out test file beside the training one: two of the good samples, copied.
  with open(os.path.join(manual, 'llava.json')) as f:
    samples = json.load(f)
  test = [dict(s, id='test_' + s['id']) for s in samples if s['id'] in ('good_0', 'good_1')]
  with open(os.path.join(manual, 'held_out.json'), 'w') as f:
    json.dump(test, f)
  tokenizer = h.make_tokenizer(str(root / 'tokenizer' / 'tokenizer.json'))
  return manual, tokenizer, str(root / 'tfds')


def _run(shared, llava, workdir, *flags, check=True):
  manual, tokenizer, data_dir = llava
  return h.run_main(shared, workdir, *h.SINGLE_MESH, f'--config.data.manual_dir={manual}',
                    f'--config.data.tokenizer={tokenizer}', f'--config.data.data_dir={data_dir}',
                    '--config.train.log_every=1', '--config.checkpoint.interval=100',
                    *flags, config=CONFIG, base=(), check=check)


@pytest.mark.slow
def test_issue_command_exits_0_and_skips_the_absent_test_split(shared, llava, tmp_path):
  proc = _run(shared, llava, str(tmp_path / 'run'), *ISSUE_FLAGS)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0
  assert out.count("has no 'test' split") == 1, out[-3000:]
  assert "has no 'validation' split" not in out
  evals = h.read_metrics(str(tmp_path / 'run'), 'eval')
  assert list(evals) == [3] and evals[3]['num_examples'] > 0
  assert not h.read_metrics(str(tmp_path / 'run'), 'test')


@pytest.mark.slow
def test_test_files_are_scored_as_the_test_split(shared, llava, tmp_path):
  proc = _run(shared, llava, str(tmp_path / 'run'), '--config.train.num_steps=2',
              '--config.data.llava_json.validation_fraction=0.0',
              '--config.data.llava_json.test_files=held_out.json')
  out = proc.stdout + proc.stderr
  assert "has no 'validation' split (it has: train, test)" in out
  tests = h.read_metrics(str(tmp_path / 'run'), 'test')
  assert list(tests) == [2] and tests[2]['num_examples'] == 2, tests


def test_explicit_absent_split_fails_before_compiling(shared, llava, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _run(shared, llava, workdir, *ISSUE_FLAGS, '--config.data.test_split=heldout',
              check=False)
  assert proc.returncode != 0
  assert "config.data.test_split='heldout' is not a split of dataset 'llava_json'" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  assert not h.read_metrics(workdir)
