"""Shared pieces of the fault-injection suite: one prepared dataset, one compilation cache
and one uninterrupted reference run per test session, shared across pytest-xdist workers
(file locks), so that every fault test only pays for its own restarts.
"""

import fcntl
import json
import os
import shutil

import pytest

import reliability_helpers as h


def _shared_root(tmp_path_factory) -> str:
  """A folder all xdist workers of this session share."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  path = os.path.join(str(root), 'reliability_shared')
  os.makedirs(path, exist_ok=True)
  return path


def once(root: str, name: str, build) -> str:
  """Runs `build(path)` once per session across workers; returns the path."""
  path = os.path.join(root, name)
  with open(os.path.join(root, f'{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(os.path.join(path, 'DONE')):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        build(path)
        with open(os.path.join(path, 'DONE'), 'w') as f:
          f.write('ok')
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path


@pytest.fixture(scope='session')
def shared(tmp_path_factory) -> h.Shared:
  root = _shared_root(tmp_path_factory)
  return h.Shared(tfds_dir=os.path.join(root, 'tfds'), cache_dir=os.path.join(root, 'jax_cache'),
                  root=root)


@pytest.fixture(scope='session')
def reference(shared) -> h.Reference:
  """The uninterrupted single-process run every fault test compares with."""
  def build(path):
    proc = h.run_main(shared, os.path.join(path, 'run'), *h.SINGLE_MESH)
    with open(os.path.join(path, 'stdout.txt'), 'w') as f:
      f.write(proc.stdout + proc.stderr)
  path = once(shared.root, 'reference', build)
  workdir = os.path.join(path, 'run')
  losses = h.train_losses(workdir)
  assert sorted(losses) == list(range(1, h.NUM_STEPS + 1)), losses
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['num_steps'] == h.NUM_STEPS
  return h.Reference(workdir=workdir, losses=losses)
