r"""Runs a sweep: every variant and seed of an experiment, into ROOT/<variant>/<seed>/.

  python -m experiments.run shapes_projector --workdir=workdirs/shapes_projector
  python -m experiments.run shapes_projector --workdir=ROOT --dry_run
  python -m experiments.run shapes_projector --workdir=ROOT --only=linear,mlp2x_gelu
  python -m experiments.run shapes_projector --workdir=gs://BUCKET/sweeps/proj \
      --launcher=tpu --tpu_name=my-pod --tpu_zone=us-east5-a --dry_run
  python -m experiments.run shapes_projector --workdir=/shared/sweeps/proj \
      --launcher=slurm --nodes=2 --gpus_per_node=8 --set=mesh.fsdp=8

`--dry_run` prints, for each run, its config diff against the base and the exact command
(for `slurm`, the sbatch script) without running or writing anything. Without it, `local`
runs the sweep here (finished runs are skipped, so calling it again resumes), `tpu` runs
the gcloud commands one after another, and `slurm` writes `job.sbatch` in each run folder
and submits it with sbatch.
"""

import argparse
import ast
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from experiments import launchers
from experiments import runs as runs_lib
from experiments import sweep as sweep_lib


def parse_set(items: list[str]) -> dict:
  """`KEY=VALUE` strings -> {KEY: value}; values are Python literals when they parse."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--set expects KEY=VALUE, got {item!r}')
    try:
      out[key.removeprefix('config.')] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.removeprefix('config.')] = value
  return out


def format_diff(d: dict) -> str:
  if not d:
    return '(the base config)'
  return ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in d.items())


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m experiments.run', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('experiment', help='a file in experiments/ (shapes_projector) or a path')
  p.add_argument('--workdir', required=True, help='sweep root; runs go to ROOT/<variant>/<seed>')
  p.add_argument('--launcher', default='local', choices=('local', 'tpu', 'slurm'))
  p.add_argument('--dry_run', action='store_true', help='print diffs and commands only')
  p.add_argument('--only', default='', help='comma-separated variant names to run')
  p.add_argument('--seeds', default='', help='comma-separated seeds replacing the sweep\'s')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override for every run (e.g. mesh.fsdp=8); repeatable')
  p.add_argument('--python', default='', help='interpreter in the commands '
                 '(local: this one; tpu: python3; slurm: python)')
  p.add_argument('--module', default='lvm.main', help=argparse.SUPPRESS)  # tests use a stub
  g = p.add_argument_group('local')
  g.add_argument('--num_processes', type=int, default=1,
                 help='processes per run, as one multi-host job on this machine')
  g.add_argument('--stop_on_failure', action='store_true')
  g = p.add_argument_group('tpu')
  g.add_argument('--tpu_name', default='$TPU_NAME')
  g.add_argument('--tpu_zone', default='$ZONE')
  g.add_argument('--tpu_project', default='')
  g.add_argument('--repo_dir', default='', help='the lvm checkout on the workers/nodes '
                 '(tpu: ~/lvm; slurm: this checkout)')
  g = p.add_argument_group('slurm')
  g.add_argument('--nodes', type=int, default=1)
  g.add_argument('--gpus_per_node', type=int, default=8)
  g.add_argument('--partition', default='')
  g.add_argument('--account', default='')
  g.add_argument('--time', default='24:00:00')
  g.add_argument('--cpus_per_task', type=int, default=0)
  g.add_argument('--sbatch', action='append', default=[], metavar='OPTION',
                 help='extra #SBATCH option, e.g. --sbatch=--qos=high; repeatable')
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if hasattr(sys.stdout, 'reconfigure'):
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up in a redirected log
  sweep = sweep_lib.load_sweep(args.experiment)
  if args.seeds:
    seeds = tuple(int(s) for s in args.seeds.split(','))
    sweep = dataclasses.replace(
        sweep, seeds=seeds,
        variants=[dataclasses.replace(v, seeds=None) for v in sweep.variants])
  extra = parse_set(args.set)
  only = [x for x in args.only.split(',') if x]
  todo = sweep.runs(only)
  root = args.workdir.rstrip('/')
  if args.launcher != 'tpu' and '://' not in root:
    root = os.path.abspath(root)  # runs start in the repository root, not here

  # Resolve every run's config before launching anything: a bad key fails here, at once.
  base = sweep_lib.load_config(sweep.config)
  base_flat = sweep_lib.flatten(base)
  # Shared overrides are shown once; each run's diff is against base + shared.
  shared = sweep_lib.apply_overrides(base, {**sweep.overrides, **extra})
  shared_diff = sweep_lib.diff(base, shared)
  diffs, configs = {}, {}
  for variant, seed in todo:
    cfg = sweep_lib.apply_overrides(base, {**sweep.overrides_of(variant, seed), **extra})
    diffs[variant.name, seed] = sweep_lib.diff(shared, cfg, ignore=sweep.seed_keys)
    configs[variant.name, seed] = cfg

  python = args.python or {'local': launchers.python_executable(), 'tpu': 'python3',
                           'slurm': 'python'}[args.launcher]
  commands = {(v.name, s): launchers.main_command(
      sweep, v, s, launchers.run_dir(root, v, s), python=python, module=args.module,
      extra_overrides=extra) for v, s in todo}

  print(f'# sweep {sweep.name}: {len(todo)} runs ({len({v.name for v, _ in todo})} variants) '
        f'of {sweep.config} into {root}/<variant>/<seed>/')
  if sweep.description:
    print(f'# {sweep.description}')
  if shared_diff:
    print(f'# every run, vs the base: {format_diff(shared_diff)}')
  # sweep.json lets compare list runs that have not started; a TPU workdir that is a path
  # on the workers (a GCS mount) does not exist here, a gs:// one does.
  if not args.dry_run and (args.launcher != 'tpu' or '://' in root):
    record = dict(sweep.to_json(), base_config=base_flat,
                  extra_overrides={k: sweep_lib.jsonable(v) for k, v in extra.items()})
    runs_lib.write_text(runs_lib.join(root, runs_lib.SWEEP_FILE), json.dumps(record, indent=1))

  if args.launcher == 'local':
    return _run_local(args, root, todo, diffs, commands, configs)
  if args.launcher == 'tpu':
    return _run_tpu(args, root, todo, diffs, commands)
  return _run_slurm(args, sweep, root, todo, diffs, commands, configs)


def _header(variant, seed, root, diffs):
  print(f'\n== {variant.name} / seed {seed} -> {runs_lib.join(root, variant.name, str(seed))}')
  print(f'  diff vs base: {format_diff(diffs[variant.name, seed])}')


def stale_diff(workdir: str, config) -> dict:
  """How the config a run folder was made with (its config.json) differs from `config`."""
  ran = runs_lib.read_json(runs_lib.join(workdir, 'config.json'))
  return sweep_lib.diff(ran, config) if ran else {}


def _run_local(args, root, todo, diffs, commands, configs) -> int:
  launcher = launchers.LocalLauncher(num_processes=args.num_processes)
  counts = {'done': 0, 'skipped': 0, 'failed': 0}
  for variant, seed in todo:
    _header(variant, seed, root, diffs)
    cmd = commands[variant.name, seed]
    workdir = launchers.run_dir(root, variant, seed)
    # (With --num_processes, the coordinator port shown is an example: a free one is
    # picked at launch and recorded in launch.json.)
    for c in launcher.process_commands(cmd, port=launcher.port or 12345):
      print('  $ ' + shlex.join(c))
    state = runs_lib.status(workdir)
    # A folder made with another config (the experiment or its base changed since) is
    # neither a result of this sweep nor a checkpoint to resume from: say so, touch nothing.
    stale = stale_diff(workdir, configs[variant.name, seed]) if state != 'pending' else {}
    if stale:
      print(f'  {state}, but made with another config (ran -> now: {format_diff(stale)}): '
            'left as is; use a new --workdir (or delete this folder) to run it again')
      counts['failed'] += 1
      continue
    if state in ('done', 'running'):
      print(f'  {state}: skipped')
      counts['skipped'] += 1
      continue
    if args.dry_run:
      print(f'  status: {state}')
      continue
    t0 = time.time()
    rc = launcher.launch(workdir, cmd, log=print)
    state = runs_lib.status(workdir)
    print(f'  exit code {rc} after {time.time() - t0:.0f}s: {state}')
    if state == 'done':
      counts['done'] += 1
    else:
      counts['failed'] += 1
      print(f'  see {runs_lib.join(workdir, runs_lib.LOG_FILE)}')
      if args.stop_on_failure:
        break
  if not args.dry_run:
    print(f'\n# {counts["done"]} ran, {counts["skipped"]} skipped (finished or running), '
          f'{counts["failed"]} failed, unfinished or stale. Compare: python -m experiments.compare {root}')
  return 1 if counts['failed'] else 0


def _run_tpu(args, root, todo, diffs, commands) -> int:
  tpu = launchers.TpuLauncher(name=args.tpu_name, zone=args.tpu_zone, project=args.tpu_project,
                              repo_dir=args.repo_dir or '~/lvm')
  if '://' not in root:
    print(f'# note: every worker writes to {root}: it must be one folder they all share '
          '(a GCS bucket mounted on each worker).', file=sys.stderr)
  failed = 0
  for variant, seed in todo:
    _header(variant, seed, root, diffs)
    line = tpu.command(commands[variant.name, seed])
    print(line)
    if not args.dry_run:
      rc = subprocess.call(line, shell=True)  # the shell expands $TPU_NAME / $ZONE
      print(f'  exit code {rc}')
      failed += rc != 0
  return 1 if failed else 0


def _run_slurm(args, sweep, root, todo, diffs, commands, configs) -> int:
  slurm = launchers.SlurmLauncher(
      nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
      account=args.account, time=args.time, repo_dir=args.repo_dir,
      cpus_per_task=args.cpus_per_task, extra_sbatch=tuple(args.sbatch))
  failed = 0
  for variant, seed in todo:
    _header(variant, seed, root, diffs)
    workdir = launchers.run_dir(root, variant, seed)
    script = slurm.script(commands[variant.name, seed], f'{sweep.name}-{variant.name}-{seed}',
                          workdir)
    if args.dry_run:
      print(script)
      continue
    state = runs_lib.status(workdir)
    stale = stale_diff(workdir, configs[variant.name, seed]) if state != 'pending' else {}
    if stale:
      print(f'  {state}, but made with another config (ran -> now: {format_diff(stale)}): '
            'left as is; use a new --workdir (or delete this folder) to run it again')
      failed += 1
      continue
    if state in ('done', 'running'):
      print(f'  {state}: skipped')
      continue
    path = runs_lib.join(workdir, 'job.sbatch')
    runs_lib.write_text(path, script)
    rc = subprocess.call(['sbatch', path])
    print(f'  sbatch {path}: exit code {rc}')
    failed += rc != 0
  return 1 if failed else 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print('\n# interrupted: the current run was asked to checkpoint and stop; run the same '
          'command again to resume the sweep.')
    sys.exit(130)
