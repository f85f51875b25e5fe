"""NaN / Inf loss from a poisoned batch: the run stops naming the step; good checkpoints stay.

`driver.py` runs `lvm.main`'s training path on the real `shapes` pipeline and replaces
the images of one train step's batch by NaN (or +Inf) before the step sees them. The
run must exit non-zero with a message naming that step, write no checkpoint from the
poisoned state, and leave the last good checkpoint equal to the reference run's.
"""

import os
import re

import pytest

import reliability_helpers as h

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('poison, step, last_good', [('nan', 5, 4), ('inf', 3, 2)])
def test_poisoned_batch_stops_the_run(shared, reference, tmp_path, poison, step, last_good):
  workdir = str(tmp_path / 'run')
  proc = h.run_main(shared, workdir, *h.SINGLE_MESH, f'--poison_step={step}',
                    f'--poison={poison}', entry=(h.DRIVER,), check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out[-3000:]
  assert f'driver: poisoned the batch of step {step} with {poison}' in out
  assert 'NonFiniteLossError' in out
  # Inf images usually turn into NaN inside the model (inf - inf in the norms).
  assert re.search(f'Loss is (nan|inf|-inf) at step {step} ', out), out[-3000:]
  assert f'the last good checkpoint is step {last_good}' in out

  # Nothing after the poisoned step was saved; what was saved is the reference's.
  assert h.checkpoint_steps(workdir) == list(range(2, last_good + 1, 2))
  h.assert_states_equal(
      h.load_state(os.path.join(workdir, 'checkpoints', str(last_good))),
      h.load_state(os.path.join(reference.workdir, 'checkpoints', str(last_good))),
      f'last good checkpoint (step {last_good})')
  losses = h.train_losses(workdir)
  assert losses == {s: reference.losses[s] for s in range(1, step)}
