"""Session-wide test setup: every test process sees 8 emulated CPU devices.

XLA reads the flag once, when jax first initializes its backends, so it is set here,
before any test module imports jax. An XLA_FLAGS already naming a device count wins.
"""

import os

_FLAG = '--xla_force_host_platform_device_count'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {_FLAG}=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
