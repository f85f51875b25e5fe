"""`python -m lvm.hf export` into an existing folder (issue 27 item 6).

A non-empty target is refused unless --overwrite; with it, the folder's model files are
replaced as a whole (an old sharded checkpoint's shards and index are gone, so the folder
loads as the new model alone) while other files (a tokenizer) stay.
"""

import json
import os
import subprocess
import sys

from flax import traverse_util
import numpy as np
import pytest

from configs import tiny
import lvm.hf
from lvm.hf import io

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(model_config, seed):
  rng = np.random.default_rng(seed)
  flat = {k: rng.normal(size=s.shape).astype(s.dtype)
          for k, s in lvm.hf.abstract_params(model_config).items()}
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """An lvm checkpoint folder (seed 1) and the tensors its export must hold."""
  root = tmp_path_factory.mktemp('export')
  model_config = tiny.get_config().model
  params = _params(model_config, 1)
  lvm.hf.save_converted(str(root / 'ckpt'), model_config, params)
  return root / 'ckpt', lvm.hf.to_tensors(model_config, params)


def _stale_folder(path):
  """A folder as an earlier sharded export left it: two shards, an index, a tokenizer."""
  path.mkdir()
  io.write_file(str(path / 'model-00001-of-00002.safetensors'),
                {'language_model.lm_head.weight': np.ones((2, 2), np.float32)})
  io.write_file(str(path / 'model-00002-of-00002.safetensors'),
                {'stale.weight': np.ones((3,), np.float32)})
  (path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {}}))
  (path / 'config.json').write_text('{"old": true}')
  (path / 'tokenizer.json').write_text('{"keep": "me"}')


def _export(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'lvm.hf', 'export', *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_export_refuses_non_empty_folder_then_overwrites_whole(converted, tmp_path):
  ckpt, expected = converted
  target = tmp_path / 'hf'
  _stale_folder(target)
  before = sorted(os.listdir(target))

  proc = _export(str(ckpt), str(target))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'{target} is not empty' in proc.stderr and '--overwrite' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert sorted(os.listdir(target)) == before  # nothing touched

  proc = _export(str(ckpt), str(target), '--overwrite')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(target)) == ['config.json', 'model.safetensors', 'tokenizer.json']
  assert (target / 'tokenizer.json').read_text() == '{"keep": "me"}'
  assert json.loads((target / 'config.json').read_text())['model_type'] == 'llava'
  got = io.read_folder(str(target))  # would raise on a tensor in two files
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_save_into_empty_or_new_folder_needs_no_flag(converted, tmp_path):
  """Item 6: an empty or missing folder is not 'existing' (no --overwrite needed)."""
  model_config = tiny.get_config().model
  params = _params(model_config, 2)
  (tmp_path / 'empty').mkdir()
  for name in ('empty', 'new/nested'):
    lvm.hf.save(model_config, params, str(tmp_path / name))
    assert sorted(os.listdir(tmp_path / name)) == ['config.json', 'model.safetensors']
  with pytest.raises(FileExistsError, match='is not empty'):
    lvm.hf.save(model_config, params, str(tmp_path / 'empty'))
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]  # no staging left
