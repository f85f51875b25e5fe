"""Bad configs through `python -m lvm.main`: a clear answer naming the key, before compiling.

Each case is a real `lvm.main` process with one bad override on the tiny config. It must
exit non-zero with a message naming the key and the fix, without compiling anything:
the run's workdir gets no checkpoint and no metrics, and the process's wall time is
printed (dominated by Python and JAX start-up; the check itself takes milliseconds,
see tests/test_validate.py).
"""

import concurrent.futures
import os
import subprocess
import time

import pytest

import reliability_helpers as h

CASES = {
    'unknown_key': (['--config.train.batch_sise=4'], ['batch_sise', 'Did you mean', 'batch_size']),
    'wrong_type': (['--config.train.batch_size=eight'], ['--config.train.batch_size', 'eight']),
    'mesh_product': (['--config.mesh.data=3', '--config.mesh.fsdp=2', '--config.mesh.tensor=1'],
                     ['config.mesh', 'equal 8', '-1']),
    'batch_divisibility': (['--config.train.batch_size=12'],
                           ['config.train.batch_size: 12 is not divisible by mesh.data*mesh.fsdp = 8',
                            'multiple of 8']),
    'seq_len_vs_image_tokens': (['--config.data.seq_len=16'],
                                ['config.data.seq_len: 16 leaves no room for text', 'above 16']),
    'heads_vs_tensor': (['--config.mesh.data=1', '--config.mesh.tensor=8'],
                        ['config.model.decoder.heads: 4 is not divisible by mesh.tensor = 8']),
    'trainable_matches_nothing': (['--config.train.stage=custom',
                                   '--config.train.trainable=^visoin/'],
                                  ["config.train.trainable: the trainable pattern '^visoin/'",
                                   'matches none of the', 'Fix:']),
    'unknown_template': (['--config.data.template=vicuna'],
                         ["config.data.template: 'vicuna' is not a registered template",
                          'vicuna_v1']),
    # Issue 27: reported once, naming the valid kinds (it was twice, the second misleading).
    'unknown_projector': (['--config.model.projector.kind=conv'],
                          ['config.model.projector.kind: ', "'conv'", 'downsample_mlp']),
    # Issue 27: a typo in a boolean colon arg silently meant False.
    'bool_colon_arg_typo': ('configs/tiny.py:scan=ture', ["Config arg scan='ture' is not a "
                                                          'boolean', 'true']),
}
ONE_LINE = {'unknown_projector': 'config.model.projector.kind'}


def _run(shared, workdir, overrides):
  """`overrides`: flags, or a `--config=` value (a config file with colon args)."""
  start = time.monotonic()
  cmd = (h.main_cmd(shared, workdir, config=overrides) if isinstance(overrides, str)
         else h.main_cmd(shared, workdir, *overrides))
  proc = subprocess.run(cmd, cwd=h.REPO, env=h.env(shared), capture_output=True, text=True,
                        timeout=300)
  return proc, time.monotonic() - start


def test_bad_configs_fail_fast_with_the_key_and_fix(shared, tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_run, shared, str(tmp_path / name), overrides)
               for name, (overrides, _) in CASES.items()}
    results = {name: f.result() for name, f in futures.items()}
  times = {}
  for name, (proc, seconds) in results.items():
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, name
    for text in CASES[name][1]:
      assert text in out, f'{name}: {text!r} not in output:\n{out[-3000:]}'
    if name in ONE_LINE:
      assert out.count(ONE_LINE[name]) == 1, f'{name}: not one line:\n{out[-3000:]}'
    workdir = tmp_path / name
    assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()
    times[name] = round(seconds, 1)
  print('seconds to fail (process start to exit):', times)
  # Generous: start-up alone is seconds on a loaded 2-core machine; no case may reach a
  # compile (which would also leave metrics or checkpoints behind).
  assert max(times.values()) < 120, times
