"""Session-wide test setup: every test process sees 8 emulated CPU devices.

XLA reads the flag once, when jax first initializes its backends, so it is set here,
before any test module imports jax. An XLA_FLAGS already naming a device count wins.

The session's processes (xdist workers, the `lvm.main` runs the tests start) share one
persistent compilation cache, new for each session: many tests compile the same tiny
programs (measured on 2 cores: tests/test_train.py, test_sharding.py and lora/ 343 s
without, 271 s with; the whole suite 1349 s without, 1214 s with). A
JAX_COMPILATION_CACHE_DIR already set wins.
"""

import atexit
import os
import shutil
import tempfile

_FLAG = '--xla_force_host_platform_device_count'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {_FLAG}=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lvm-tests-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  # Every compile is worth keeping here: the tiny programs compile in well under a second.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
