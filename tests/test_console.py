"""The console: library logs quiet by default (absl --verbosity brings them back), bars only
on terminals, and lvm's own lines kept."""

import logging
import os
import re
import subprocess
import sys

from lvm import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files orbax logs its INFO lines from while it saves and restores (about 70 a demo run).
ORBAX = re.compile(r'^I\d{4} .*(checkpoint_manager|atomicity|async_checkpointer)\.py:\d+\]',
                   re.M)


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


def _record(level, pathname):
  return logging.LogRecord('x', level, pathname, 1, 'message', None, None)


def test_quiet_libraries_passes_own_lines_and_warnings_only_within_the_block():
  handler = _Records()
  root = logging.getLogger()
  root.addHandler(handler)
  own = os.path.join(ROOT, 'lvm', 'data', 'shapes.py')
  other = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  try:
    with console.quiet_libraries(verbose=False):
      for level, path in ((logging.INFO, own), (logging.INFO, other),
                          (logging.WARNING, other), (logging.DEBUG, other)):
        handler.handle(_record(level, path))
    handler.handle(_record(logging.INFO, other))  # after the block: everything again
    with console.quiet_libraries(verbose=True):
      handler.handle(_record(logging.INFO, other))
  finally:
    root.removeHandler(handler)
  got = [(r.levelno, r.pathname) for r in handler.records]
  assert got == [(logging.INFO, own), (logging.WARNING, other), (logging.INFO, other),
                 (logging.INFO, other)]


def test_progress_bars_only_on_a_terminal():
  items = [1, 2, 3]
  assert not sys.stdout.isatty()  # pytest captures stdout
  assert console.progress(items, total=3) is items
  assert console.bar(10) is None


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'lvm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_training_console_has_no_orbax_info_lines_unless_asked(tmp_path):
  args = ['--config=configs/shapes.py:train=32,steps=2,batch_size=8',
          f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "data"}',
          '--config.data.shapes.validation=8', '--config.data.shapes.test=8',
          '--config.model.vision.depth=1', '--config.model.decoder.depth=1',
          '--config.train.log_every=1', '--config.data.eval_split=']
  out = _run(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not ORBAX.search(out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]
  # lvm's own lines stay: the plain step lines (stdout is not a terminal) and its logs.
  assert re.search(r'^step 2/2 loss \d+\.\d{4} lr ', out.stdout, re.M), out.stdout
  assert 'shapes test image-blind majority baseline' in out.stderr
  # absl's --verbosity, given explicitly, shows every library's INFO lines again.
  again = _run(*args[:-1], '--config.train.num_steps=3', '--verbosity=0')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from' in again.stdout
  assert ORBAX.search(again.stdout + again.stderr)
