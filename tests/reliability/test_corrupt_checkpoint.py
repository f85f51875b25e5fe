"""Corrupt or partial checkpoints: the run says so and restores the previous good one.

A copy of the reference run's workdir (checkpoints at steps 2, 4, 6, 8) is damaged for
real, newest first, one defect per step:
  step 8: a data file of the train state truncated to a third (a torn write),
  step 6: a file removed (the state's OCDBT manifest, the root of its array store),
  step 4: its commit marker (`commit_success.txt`) removed (a save that never finished).
The same `lvm.main` command then has to warn about each of the three, move them to
`checkpoints_corrupt/` (never delete), restore step 2, and train steps 3..8 again with
the reference run's losses and final state, bit for bit. Because the restore falls
through all three, each defect is shown to be detected on its own. Step 2 (good) is
never touched.

Falling back past a checkpoint that orbax gives up on (a truncated file, another shape)
also prints none of the tracebacks of the reads orbax left pending on it.
"""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from configs import tiny
from lvm import checkpoint

import reliability_helpers as h

pytestmark = pytest.mark.slow


def _largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_corrupt_newest_checkpoints_fall_back(shared, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference.workdir, workdir)
  assert h.checkpoint_steps(workdir) == [2, 4, 6, 8]
  ckpt = os.path.join(workdir, 'checkpoints')
  good_before = h.load_state(os.path.join(ckpt, '2'))

  victim = _largest_file(os.path.join(ckpt, '8', 'state'))
  size = os.path.getsize(victim)
  with open(victim, 'r+b') as f:
    f.truncate(size // 3)
  manifests = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(ckpt, '6', 'state'))
               for f in names if f == 'manifest.ocdbt']
  assert manifests
  for path in manifests:
    os.remove(path)
  os.remove(os.path.join(ckpt, '4', 'commit_success.txt'))

  proc = h.run_main(shared, workdir, *h.SINGLE_MESH)
  out = proc.stdout + proc.stderr
  for step in (8, 6, 4):
    assert f'checkpoint step {step} is unusable' in out, out[-5000:]
    assert os.path.isdir(os.path.join(workdir, 'checkpoints_corrupt', str(step)))
  assert 'commit marker commit_success.txt missing' in out
  assert f'Resumed from {ckpt}/2' in out

  # The good checkpoint is intact and still there; the run saved new 4, 6, 8.
  assert h.checkpoint_steps(workdir) == [2, 4, 6, 8]
  h.assert_states_equal(h.load_state(os.path.join(ckpt, '2')), good_before, 'step 2')
  losses = h.train_losses(workdir)
  assert losses == reference.losses
  h.assert_states_equal(h.load_state(os.path.join(ckpt, '8')),
                        h.load_state(os.path.join(reference.workdir, 'checkpoints', '8')),
                        'final state after falling back to step 2')
  # The damaged copies are kept for inspection, damage included.
  moved = os.path.join(workdir, 'checkpoints_corrupt', '8', os.path.relpath(victim,
                                                                           os.path.join(ckpt, '8')))
  assert os.path.getsize(moved) == size // 3


def test_no_checkpoint_restores_is_an_error_and_moves_nothing(shared, reference, tmp_path):
  """If every checkpoint fails (here: all manifests gone), the run stops and keeps them."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference.workdir, workdir, ignore=shutil.ignore_patterns('manifest.ocdbt'))
  proc = h.run_main(shared, workdir, *h.SINGLE_MESH, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert 'No checkpoint in' in out and 'restores' in out
  assert h.checkpoint_steps(workdir) == [2, 4, 6, 8]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_corrupt'))


# Restores, in a fresh process with every unraisable exception recorded (standing for
# stderr), the newest step that restores of a workdir. Prints the step, how many reports
# lvm dropped as orbax's abandoned reads, and the ones it let through.
_RESTORE = """
import gc, json, sys, time
reported = []
sys.unraisablehook = reported.append
import jax, numpy as np
from lvm import checkpoint
dropped = []
is_abandoned = checkpoint._is_abandoned_read
checkpoint._is_abandoned_read = lambda u: is_abandoned(u) and not dropped.append(u)
workdir, reader, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = {k: jax.ShapeDtypeStruct(v, np.float32, sharding=device) for k, v in shapes.items()}
if reader == 'load_params':
  params = checkpoint.load_params(workdir, target, log=lambda _: None)[1]
  step = int(params['marker'][0])
else:
  resumed = checkpoint.Checkpointer(workdir, checkpoint.load_config(workdir).checkpoint)
  step = resumed.restore_latest({'params': target}, log=lambda _: None)[0]
  resumed.close()
time.sleep(1)  # reads still in flight finish and find orbax's event loop closed
gc.collect()  # read coroutines left pending are collected
print(json.dumps({'step': step, 'dropped': len(dropped),
                  'reported': [f'{u.exc_value!r} in {u.object!r}' for u in reported]}))
"""


@pytest.mark.parametrize('reader', ['load_params', 'resume'])
def test_abandoned_reads_of_a_failed_step_print_nothing(reader, tmp_path):
  """orbax gives up on step 2 with four large reads in flight; none of them prints.

  Step 2's `marker` array has another shape than the target's, which orbax rejects as soon
  as it reaches that array, while the four 4 MiB arrays' reads are still pending (each an
  'Exception ignored' traceback of ~40 lines on stderr, unfiltered). Inference's reader
  and training's resume then restore step 1. A truncated file does the same (see
  test_inference_inputs.py's `lvm.generate`), but how many of its reads are still pending
  when it fails depends on thread timing, from none to dozens; a shape is checked at once.
  """
  config = tiny.get_config()
  workdir = tmp_path / 'run'
  saver = checkpoint.Checkpointer(str(workdir), config.checkpoint)
  rng = np.random.default_rng(0)
  large = {f'large{i}': rng.standard_normal((1024, 1024), np.float32) for i in range(4)}
  saver.save(1, {'params': {**large, 'marker': np.ones((2,), np.float32)}}, {}, config)
  saver.save(2, {'params': {**large, 'marker': np.full((3,), 2, np.float32)}}, {}, config)
  saver.close()
  shapes = {**{k: v.shape for k, v in large.items()}, 'marker': (2,)}
  proc = subprocess.run([sys.executable, '-c', _RESTORE, str(workdir), reader,
                         json.dumps(shapes)], env=h.env(None, 1), cwd=h.REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result['step'] == 1
  assert result['reported'] == []
  assert result['dropped'] >= 1, 'no read of step 2 was left pending: nothing was checked'


def test_other_unraisable_exceptions_are_still_reported(monkeypatch):
  """The filter drops only orbax's leftovers: any other report reaches the previous hook,
  an orbax save coroutine's included."""
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  checkpoint.quiet_abandoned_reads()

  class RaisesOnDelete:
    def __del__(self):
      raise ValueError('not a checkpoint read')
  RaisesOnDelete()
  assert [repr(u.exc_value) for u in reported] == ["ValueError('not a checkpoint read')"]

  # Coroutine objects of orbax's read and save (never run), reported as the GC would.
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  read = serialization._read_array_index_and_device_put(  # pylint: disable=protected-access
      [], (), None, global_shape=None, new_shard_shape=None, dtype=None, byte_limiter=None,
      strict=True, dll=None, memory_kind=None)
  save = serialization.async_serialize(None, {})
  for coroutine, error in ((read, 'read abandoned'), (save, 'save failed')):
    sys.unraisablehook(types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=RuntimeError(error), exc_traceback=None,
        err_msg=None, object=coroutine))
    coroutine.close()
  assert [repr(u.exc_value) for u in reported[1:]] == ["RuntimeError('save failed')"]
