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
"""

import os
import shutil

import pytest

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
