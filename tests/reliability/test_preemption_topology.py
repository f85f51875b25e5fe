"""Preemption of a 2-process run, and restarts on another topology.

Two `lvm.main` processes with 4 CPU devices each (jax.distributed on 127.0.0.1) train
on mesh (8,1,1). A real SIGTERM goes to process 1 only. Both processes must agree to
stop, write one checkpoint at the same step s1 (a collective orbax save: each process
logs its part of it) and exit 0. Then ONE process with mesh (2,2,2) resumes that
checkpoint and is itself preempted by SIGTERM at s2 > s1 (so it writes a checkpoint on
that topology), and the 2-process (8,1,1) command resumes that one and finishes.
Every logged step's loss equals the uninterrupted single-process (8,1,1) reference to
1e-5 relative (float32; the reduction order across processes is not fixed, so the
comparison is not bit for bit), and the final parameters agree to 1e-5.
"""

import os
import shutil
import signal
import time

import numpy as np
import pytest

import reliability_helpers as h

pytestmark = pytest.mark.slow


def _start_two(shared, workdir, tmp_path, tag):
  port = h.free_port()
  procs = []
  for i in range(2):
    # --verbosity=0: the test reads orbax's own INFO lines (each process's part in a save),
    # which the console holds back by default.
    flags = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
             '--verbosity=0']
    procs.append(h.start_main(shared, workdir, str(tmp_path / f'{tag}_p{i}.log'), *h.SINGLE_MESH,
                              num_devices=4, extra_flags=flags))
  return procs


# On a heavily loaded machine, XLA's gloo set-up can miss its fixed 30 s deadline when one
# process is still compiling the train step while the other waits in the first collective
# (`Gloo context initialization failed: DEADLINE_EXCEEDED`). That is the test machine, not
# lvm: the operator's answer, rerunning the same command, is what the test does then, after
# letting both processes finish (so that the rerun finds the step in the compilation cache).
_GLOO_TIMEOUT = 'Gloo context initialization failed'


def _wait_all(procs, logs=(), timeout=600, grace=120):
  """Exit codes of all processes. Once one fails (or a log shows the gloo timeout), the
  others get `grace` s to finish on their own, then SIGKILL."""
  end = time.monotonic() + timeout
  failed_at = None
  while time.monotonic() < end:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
      return codes
    if failed_at is None and (any(c not in (None, 0) for c in codes)
                              or any(_GLOO_TIMEOUT in _text(log) for log in logs)):
      failed_at = time.monotonic()
    if failed_at is not None and time.monotonic() - failed_at > grace:
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      h.kill_group(p)
  return [p.wait() for p in procs]


def _run_two(shared, workdir, tmp_path, tag, attempts=3):
  """Runs a 2-process lvm.main to the end; returns process 0's log text."""
  for attempt in range(attempts):
    name = f'{tag}{attempt}'
    paths = [tmp_path / f'{name}_p{i}.log' for i in range(2)]
    codes = _wait_all(_start_two(shared, workdir, tmp_path, name), paths)
    logs = [_text(path) for path in paths]
    if codes == [0, 0]:
      return logs[0]
    if not any(_GLOO_TIMEOUT in log for log in logs):
      break
    print(f'{name}: gloo set-up timed out under load; rerunning the same command')
  raise AssertionError(f'2-process run failed {codes}:\n' + logs[0][-3000:] + logs[1][-3000:])


def _text(path):
  with open(path, errors='replace') as f:
    return f.read()


def _sigterm_after(proc_to_signal, procs, workdir, min_step, timeout=600):
  """SIGTERM to one process once metrics.jsonl shows a step >= min_step."""
  ok = h.wait_for(lambda: max(h.read_metrics(workdir), default=0) >= min_step
                  or any(p.poll() is not None for p in procs), timeout, interval=0.01)
  assert ok and all(p.poll() is None for p in procs), 'the run ended before the SIGTERM'
  proc_to_signal.send_signal(signal.SIGTERM)


def _preempted_step(log_text):
  marker = 'SIGTERM: saving a checkpoint at step '
  assert marker in log_text, log_text[-4000:]
  return int(log_text.split(marker)[1].split()[0])


def _assert_close_to_reference(workdir, reference, what):
  losses = h.train_losses(workdir)
  assert sorted(losses) == sorted(reference.losses), (what, losses)
  got = np.array([losses[s] for s in sorted(losses)])
  want = np.array([reference.losses[s] for s in sorted(losses)])
  np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=what)
  final = h.NUM_STEPS
  a = h.load_state(os.path.join(workdir, 'checkpoints', str(final)))['params']
  b = h.load_state(os.path.join(reference.workdir, 'checkpoints', str(final)))['params']
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=what)


def test_preempt_one_of_two_processes_then_change_topology(shared, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  ckpt = os.path.join(workdir, 'checkpoints')
  # 2 processes, mesh (8,1,1): SIGTERM to process 1 only.
  for attempt in range(3):
    name = f'a{attempt}'
    shutil.rmtree(workdir, ignore_errors=True)
    procs = _start_two(shared, workdir, tmp_path, name)
    _sigterm_after(procs[1], procs, workdir, min_step=2)
    paths = [tmp_path / f'{name}_p{i}.log' for i in range(2)]
    codes = _wait_all(procs, paths)
    logs = [_text(path) for path in paths]
    if codes == [0, 0] or not any(_GLOO_TIMEOUT in log for log in logs):
      break
  assert codes == [0, 0], [log[-3000:] for log in logs]
  s1 = _preempted_step(logs[0])
  assert 2 <= s1 < h.NUM_STEPS
  assert max(h.checkpoint_steps(workdir)) == s1
  # One collective save at s1: each process took part in it.
  for i in range(2):
    assert f'[process={i}]' in logs[i] and f'checkpoints/{s1}' in logs[i], logs[i][-3000:]
  assert max(h.read_metrics(workdir)) == s1

  # -> 1 process, mesh (2,2,2): resumes from s1 and is itself preempted at s2 > s1.
  proc = h.start_main(shared, workdir, str(tmp_path / 'b.log'), *h.CUBE_MESH)
  _sigterm_after(proc, [proc], workdir, min_step=s1 + 1)
  assert proc.wait(timeout=600) == 0, _text(tmp_path / 'b.log')[-4000:]
  log = _text(tmp_path / 'b.log')
  assert f'Resumed from {ckpt}/{s1}' in log
  s2 = _preempted_step(log)
  assert s1 < s2 < h.NUM_STEPS, (s1, s2)
  assert max(h.checkpoint_steps(workdir)) == s2

  # -> 2 processes, mesh (8,1,1) again: resumes from s2 and finishes.
  log = _run_two(shared, workdir, tmp_path, 'c')
  assert f'Resumed from {ckpt}/' in log
  _assert_close_to_reference(
      workdir, reference, f'(8,1,1) x2 -> preempted at {s1} -> (2,2,2) x1 -> preempted at {s2} '
      '-> (8,1,1) x2')
