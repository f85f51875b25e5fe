"""Workdirs anywhere orbax can write (issue 27 item 2, issue 20 item 7).

`--workdir=gs://bucket/run` used to become a local folder named `gs:` and crash inside
orbax at the first checkpoint. Checked offline: URIs reach orbax and epath unchanged (no
local `gs:` folder), a `epath.Path` workdir saves and restores, and a workdir that cannot
be written (an unreachable bucket, a file in the way) stops `python -m lvm.main` with one
line before anything is compiled. A real bucket is not reachable from the tests.
"""

import os
import subprocess
import sys
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lvm import checkpoint
from lvm import cli
from lvm import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CKPT = ml_collections.ConfigDict({'interval': 1, 'keep': 2, 'async_save': False})


def test_uris_reach_orbax_unchanged(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.as_path('gs://bucket/run')) == 'gs://bucket/run'
  assert str(checkpoint.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  assert str(checkpoint.as_path('rel/run')) == str(tmp_path / 'rel' / 'run')  # local: absolute
  seen = {}

  class Recorder:
    def __init__(self, directory, **kw):
      seen['directory'], seen['options'] = directory, kw['options']

  monkeypatch.setattr(ocp, 'CheckpointManager', Recorder)
  ckpt = checkpoint.Checkpointer('gs://bucket/run', CKPT)
  assert str(seen['directory']) == 'gs://bucket/run/checkpoints'
  assert str(ckpt.directory) == 'gs://bucket/run/checkpoints'
  assert (evaluate.default_out_dir('gs://b/run/checkpoints/4', 'pope')
          == 'gs://b/run/eval/pope_step4')
  assert evaluate.default_out_dir('gs://b/run', 'pope') == 'gs://b/run/eval/pope'
  assert os.listdir(tmp_path) == []  # no local folder named gs:


def test_epath_workdir_saves_and_restores(tmp_path):
  """Checkpointer takes an epath.Path as well as a str; the fallback restore reads it."""
  workdir = epath.Path(tmp_path) / 'run'
  ckpt = checkpoint.Checkpointer(workdir, CKPT)
  state = {'params': {'w': jnp.arange(8, dtype=jnp.float32)}}
  ckpt.save(3, state, {'pos': 7}, ml_collections.ConfigDict({'a': 1}))
  ckpt.wait()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          state)
  step, restored, data_state = ckpt.restore_latest(abstract, log=lambda _: None)
  ckpt.close()
  assert (step, data_state) == (3, {'pos': 7})
  np.testing.assert_array_equal(restored['params']['w'], np.arange(8))
  config, params = checkpoint.load_params(workdir)
  assert config.a == 1 and np.asarray(params['w']).tolist() == list(range(8))


def _main(workdir, cwd):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             TF_CPP_MIN_LOG_LEVEL='3')
  start = time.monotonic()
  proc = subprocess.run([sys.executable, '-m', 'lvm.main',
                         f'--config={os.path.join(REPO, "configs", "tiny.py")}',
                         f'--workdir={workdir}'], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=300)
  return proc, time.monotonic() - start


def test_unwritable_workdirs_fail_before_compiling(tmp_path):
  (tmp_path / 'afile').write_text('x')
  for workdir, why in (('gs://lvm-tests-unreachable-bucket/run', 'cannot write there'),
                       (str(tmp_path / 'afile' / 'run'), 'NotADirectoryError')):
    proc, seconds = _main(workdir, tmp_path)
    assert proc.returncode == cli.USAGE_ERROR, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith('Error:')]
    assert len(errors) == 1 and errors[0].startswith(f'Error: --workdir={workdir}: '), errors
    assert why in errors[0]
    assert 'Traceback' not in proc.stderr
    assert 'JAX process' not in proc.stderr  # stopped before the devices were touched
    assert seconds < 200
  assert sorted(os.listdir(tmp_path)) == ['afile']  # no local folder named gs:
