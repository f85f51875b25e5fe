"""Tests of experiments/sweep.py: overrides, diffs, and flags that lvm.main parses back."""

import os
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from experiments import launchers
from experiments import sweep as sweep_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'fixture_sweep.py')


def test_fixture_sweep_runs_and_overrides():
  s = sweep_lib.load_sweep(FIXTURE)
  runs = s.runs()
  assert [(v.name, seed) for v, seed in runs] == [
      ('linear', 0), ('linear', 1), ('mlp2x_gelu', 0), ('mlp2x_gelu', 1), ('bad_lr', 0)]
  linear = runs[1][0]
  assert s.overrides_of(linear, 1) == {
      'train.num_steps': 4, 'model.projector.kind': 'linear', 'train.seed': 1}
  assert [v.name for v, _ in s.runs(['bad_lr'])] == ['bad_lr']
  with pytest.raises(ValueError, match='unknown variants'):
    s.runs(['nope'])


def test_bad_sweeps_fail_loudly():
  with pytest.raises(ValueError, match='duplicate'):
    sweep_lib.Sweep('x', 'configs/tiny.py', [sweep_lib.Variant('a'), sweep_lib.Variant('a')])
  with pytest.raises(ValueError, match='folder-safe'):
    sweep_lib.Sweep('x', 'configs/tiny.py', [sweep_lib.Variant('a/b')])
  with pytest.raises(FileNotFoundError):
    sweep_lib.load_sweep('no_such_experiment')


def test_apply_overrides_checks_keys_and_types():
  base = sweep_lib.load_config('configs/tiny.py')
  cfg = sweep_lib.apply_overrides(base, {'model.vision.feature_layer': -1,
                                         'optimizer.lr': 3e-4, 'data.image_aspect': 'resize'})
  assert cfg.model.vision.feature_layer == -1 and cfg.optimizer.lr == 3e-4
  assert base.model.vision.feature_layer == -2  # the base is not modified
  assert sweep_lib.diff(base, cfg) == {
      'data.image_aspect': ('pad', 'resize'), 'model.vision.feature_layer': (-2, -1),
      'optimizer.lr': (1e-3, 3e-4)}
  with pytest.raises(KeyError, match='model.projector.knd'):
    sweep_lib.apply_overrides(base, {'model.projector.knd': 'linear'})
  with pytest.raises(KeyError, match='modle'):
    sweep_lib.apply_overrides(base, {'modle.projector.kind': 'linear'})
  with pytest.raises(TypeError, match='train.num_steps'):
    sweep_lib.apply_overrides(base, {'train.num_steps': 'many'})


def test_load_config_passes_colon_args():
  cfg = sweep_lib.load_config('configs/tiny.py:seq_len=96,batch_size=4')
  assert cfg.data.seq_len == 96 and cfg.train.batch_size == 4


@pytest.mark.parametrize('overrides', [
    {'model.projector.kind': 'downsample_mlp', 'train.seed': 3},
    {'model.vision.feature_layer': -1, 'model.vision.select': 'all', 'optimizer.lr': 2.5e-4},
    {'model.scan_layers': False, 'data.image_mean': (0.5, 0.5, 0.5), 'train.num_steps': 7},
])
def test_flags_parse_back_to_the_same_config(overrides, monkeypatch):
  """The --config.KEY=VALUE flags we emit give lvm.main's config_flags the same config."""
  monkeypatch.chdir(sweep_lib.REPO_ROOT)
  s = sweep_lib.Sweep('t', 'configs/tiny.py', [sweep_lib.Variant('v', overrides)])
  argv = launchers.main_command(s, s.variants[0], overrides.get('train.seed', 0), '/tmp/w')
  argv = shlex.split(shlex.join(argv))  # survives a trip through the shell
  assert argv[1:3] == ['-m', 'lvm.main']
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv, lock_config=True,
                                  sys_argv=['lvm.main'] + argv[3:])
  flags.DEFINE_string('workdir', None, '', flag_values=fv)
  fv(['lvm.main'] + argv[3:])
  expected = sweep_lib.apply_overrides(sweep_lib.load_config('configs/tiny.py'),
                                       s.overrides_of(s.variants[0], overrides.get(
                                           'train.seed', 0)))
  assert fv.workdir == '/tmp/w'
  assert sweep_lib.flatten(fv.config) == sweep_lib.flatten(expected)
  assert sweep_lib.diff(sweep_lib.load_config('configs/tiny.py'), fv.config)  # not a no-op


def test_shipped_experiments_resolve():
  """Every experiment file in experiments/ loads and all its overrides exist in its base."""
  names = [f[:-3] for f in os.listdir(os.path.join(sweep_lib.REPO_ROOT, 'experiments'))
           if f.startswith('shapes_') and f.endswith('.py')]
  assert len(names) >= 2, names
  for name in names:
    s = sweep_lib.load_sweep(name)
    base = sweep_lib.load_config(s.config)
    seen = set()
    for v, seed in s.runs():
      cfg = sweep_lib.apply_overrides(base, s.overrides_of(v, seed))
      seen.add(repr(sorted(sweep_lib.diff(base, cfg, ignore=s.seed_keys).items())))
    assert len(seen) == len(s.variants), f'{name}: two variants resolve to the same config'
