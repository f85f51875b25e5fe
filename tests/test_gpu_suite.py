"""benchmarks/gpu_suite.py's variants run as written, checked here at no device cost: each
config argument string builds benchmarks/configs/gpu_llava15.py, each `--config.*` override
names a key of it with a value of the key's type, the result validates (as on one GPU,
with cuDNN attention swapped for XLA's, which the CPU backend runs), and every other flag
is one `lvm.bench` defines."""

import os
import re

import pytest

from benchmarks import gpu_suite
from benchmarks.configs import gpu_llava15
from lvm import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_flags() -> set[str]:
  with open(os.path.join(ROOT, 'lvm', 'bench.py')) as f:
    return set(re.findall(r"DEFINE_\w+\('(\w+)'", f.read()))


def _value(text: str):
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


@pytest.mark.parametrize('name', sorted(gpu_suite.VARIANTS))
def test_variant_builds_and_validates(name, tmp_path):
  config_args, extra = gpu_suite.VARIANTS[name][:2]
  config = gpu_llava15.get_config(config_args)
  known = _bench_flags()
  with config.unlocked():
    for flag in extra:
      key, _, value = flag[2:].partition('=')
      if key.startswith('config.'):
        *path, leaf = key.split('.')[1:]
        group = config
        for part in path:
          group = group[part]
        assert leaf in group, f'{name}: {flag} names no config key'
        group[leaf] = _value(value)  # ml_collections refuses a value of another type
      else:
        assert key in known, f'{name}: {flag} is not an lvm.bench flag'
    config.model.attention_impl = 'xla'  # cuDNN's needs a GPU backend
    config.data.manual_dir = str(tmp_path)  # lvm.bench feeds synthetic batches
  validate.validate_config(config, num_devices=1)
  assert gpu_suite.described(name).startswith('XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 ')
