"""Preemption of a 2-process run, and restarts on another topology.

Two `lvm.main` processes with 4 CPU devices each (jax.distributed on 127.0.0.1) train
on mesh (8,1,1). A real SIGTERM goes to process 1 only. Both processes must agree to
stop, write one checkpoint at the same step (a collective orbax save: each process
logs its part of it) and exit 0. Then:
  - the same 2-process command resumes and finishes;
  - a copy of the preempted workdir resumes on ONE process with mesh (2,2,2), is itself
    preempted by SIGTERM (so it writes a checkpoint on that topology), and the 2-process
    (8,1,1) command resumes that checkpoint and finishes.
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
    flags = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(h.start_main(shared, workdir, str(tmp_path / f'{tag}_p{i}.log'), *h.SINGLE_MESH,
                              num_devices=4, extra_flags=flags))
  return procs


def _wait_all(procs, timeout=600):
  end = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(end - time.monotonic(), 1)))
    except Exception:  # pylint: disable=broad-except
      for q in procs:
        h.kill_group(q)
      raise
  return codes


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
  procs = _start_two(shared, workdir, tmp_path, 'a')
  _sigterm_after(procs[1], procs, workdir, min_step=2)
  assert _wait_all(procs) == [0, 0], [_text(tmp_path / f'a_p{i}.log')[-3000:] for i in range(2)]
  s1 = _preempted_step(_text(tmp_path / 'a_p0.log'))
  assert 2 <= s1 < h.NUM_STEPS
  assert max(h.checkpoint_steps(workdir)) == s1
  # One collective save at s1: each process took part in it.
  for i in range(2):
    log = _text(tmp_path / f'a_p{i}.log')
    assert f'[process={i}]' in log and f'checkpoints/{s1}' in log, log[-3000:]
  assert max(h.read_metrics(workdir)) == s1

  copy = str(tmp_path / 'run_topology')
  shutil.copytree(workdir, copy)

  # The same 2-process command resumes from s1 and finishes.
  procs = _start_two(shared, workdir, tmp_path, 'b')
  assert _wait_all(procs) == [0, 0], _text(tmp_path / 'b_p0.log')[-4000:]
  assert f'Resumed from {os.path.join(workdir, "checkpoints")}/{s1}' in _text(tmp_path / 'b_p0.log')
  _assert_close_to_reference(workdir, reference, '2 processes, preempted and resumed')

  # 2 processes (8,1,1) -> 1 process (2,2,2), preempted there at s2 > s1.
  proc = h.start_main(shared, copy, str(tmp_path / 'c.log'), *h.CUBE_MESH)
  _sigterm_after(proc, [proc], copy, min_step=s1 + 1)
  assert proc.wait(timeout=600) == 0, _text(tmp_path / 'c.log')[-4000:]
  log = _text(tmp_path / 'c.log')
  assert f'Resumed from {os.path.join(copy, "checkpoints")}/{s1}' in log
  s2 = _preempted_step(log)
  assert s1 < s2 < h.NUM_STEPS, (s1, s2)

  # 1 process (2,2,2) -> 2 processes (8,1,1), to the end.
  procs = _start_two(shared, copy, tmp_path, 'd')
  assert _wait_all(procs) == [0, 0], _text(tmp_path / 'd_p0.log')[-4000:]
  assert f'Resumed from {os.path.join(copy, "checkpoints")}/{s2}' in _text(tmp_path / 'd_p0.log')
  _assert_close_to_reference(copy, reference, f'(8,1,1)x2 -> (2,2,2)x1 at {s1} -> (8,1,1)x2 at {s2}')
