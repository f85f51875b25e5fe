"""Kill -9 at random moments, several times in one run: nothing is lost, bit for bit.

The same `python -m lvm.main` command is started, SIGKILLed (a real signal to its
process group) and started again, three times: at a random moment during the train
steps after the first checkpoint, during an asynchronous checkpoint save (while
orbax's temporary step folder exists), and at a random moment after the restarted run
has restored its checkpoint (while it restores the data-iterator state and draws its
first batches). The fourth start runs to the end. Its per-step losses and its final train
state (params, optimizer state, step) must equal the uninterrupted reference run's,
bit for bit.
"""

import os
import random
import time

import pytest

import reliability_helpers as h

pytestmark = pytest.mark.slow


def _tmp_save_dirs(workdir):
  """{(name, inode)} of orbax's unfinished step folders (`<step>.orbax-checkpoint-tmp*`)."""
  root = os.path.join(workdir, 'checkpoints')
  found = set()
  for name in os.listdir(root) if os.path.isdir(root) else ():
    if 'orbax-checkpoint-tmp' in name:
      try:
        found.add((name, os.stat(os.path.join(root, name)).st_ino))
      except FileNotFoundError:
        pass  # Renamed (finalized) meanwhile.
  return found


def _log_text(path):
  with open(path, errors='replace') as f:
    return f.read()


def _kill_when(proc, trigger, timeout=300.0, poll=0.002):
  """SIGKILLs `proc` as soon as `trigger()` is true; returns whether it did."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if proc.poll() is not None:
      return False
    if trigger():
      h.kill_group(proc)
      proc.wait()
      return True
    time.sleep(poll)
  h.kill_group(proc)
  proc.wait()
  raise AssertionError(f'no kill trigger within {timeout}s')


def test_sigkill_three_times_equals_uninterrupted(shared, reference, tmp_path):
  rng = random.Random()
  seed = rng.randrange(1 << 30)
  rng.seed(seed)
  workdir = str(tmp_path / 'run')
  kills = []

  def start(attempt):
    log = str(tmp_path / f'attempt{attempt}.log')
    return h.start_main(shared, workdir, log, *h.SINGLE_MESH), log

  # 1. During train steps: a random moment after the first checkpoint (step 2) is whole.
  proc, log = start(1)
  delay = rng.uniform(0.0, 0.5)
  state = {}

  def after_first_checkpoint():
    if 2 not in h.checkpoint_steps(workdir):
      return False
    state.setdefault('t', time.monotonic())
    return time.monotonic() - state['t'] >= delay

  assert _kill_when(proc, after_first_checkpoint), _log_text(log)
  kills.append(('during steps', delay, max(h.read_metrics(workdir))))

  # 2. During an asynchronous checkpoint save: orbax writes into
  #    `<step>.orbax-checkpoint-tmp*` and renames it when done; kill while it exists.
  #    A folder left by the previous kill does not count: only one this run creates.
  before = _tmp_save_dirs(workdir)
  proc, log = start(2)
  hit = _kill_when(proc, lambda: bool(_tmp_save_dirs(workdir) - before))
  assert hit, 'the run finished without a save to interrupt:\n' + _log_text(log)[-3000:]
  kills.append(('during async save', sorted(_tmp_save_dirs(workdir) - before),
                h.checkpoint_steps(workdir)))

  # 3. While resuming: a random moment after the restored run says where it resumed,
  #    i.e. during the data iterator's restore, its first batches and the first steps.
  proc, log = start(3)
  delay = rng.uniform(0.0, 1.0)
  state = {}

  def after_resume():
    if 'Resumed from' not in _log_text(log):
      return False
    state.setdefault('t', time.monotonic())
    return time.monotonic() - state['t'] >= delay

  hit = _kill_when(proc, after_resume)
  assert hit, 'the run finished before it could be killed:\n' + _log_text(log)[-3000:]
  kills.append(('while resuming', delay, h.checkpoint_steps(workdir)))

  # 4. The same command again, to the end.
  proc, log = start(4)
  assert proc.wait(timeout=600) == 0, _log_text(log)[-5000:]
  print(f'seed {seed}; kills: {kills}')

  losses = h.train_losses(workdir)
  assert losses == reference.losses, (
      f'per-step losses differ from the uninterrupted run (seed {seed}, kills {kills}):\n'
      f'{losses}\nvs\n{reference.losses}')
  final = h.NUM_STEPS
  assert final in h.checkpoint_steps(workdir)
  h.assert_states_equal(
      h.load_state(os.path.join(workdir, 'checkpoints', str(final))),
      h.load_state(os.path.join(reference.workdir, 'checkpoints', str(final))),
      f'final state after kills {kills} (seed {seed})')
