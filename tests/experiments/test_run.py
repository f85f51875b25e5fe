"""Tests of experiments/run.py and launchers.py with a stand-in for lvm.main (fake_main.py).

The real lvm.main is exercised by the training tests; here the sweep machinery is: which
runs start, with which flags, what is skipped on a second call, and the tpu/slurm commands.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from experiments import run as run_lib
from experiments import runs as runs_lib
from experiments import sweep as sweep_lib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'fixture_sweep.py')
FAKE_MAIN = os.path.join(HERE, 'fake_main.py')


def _run(args, capsys):
  rc = run_lib.main([FIXTURE, f'--module={FAKE_MAIN}', *args])
  return rc, capsys.readouterr().out


def _mtimes(root):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(root) for f in fs if f == 'launch.json'}


def test_local_runs_skips_finished_and_resumes(tmp_path, capsys, monkeypatch):
  root = str(tmp_path / 'sw')
  # First call: linear/0 is "preempted" at step 2 (exit 0, unfinished).
  monkeypatch.setenv('FAKE_STOP_AT', '2')
  rc, out = _run([f'--workdir={root}', '--only=linear', '--seeds=0'], capsys)
  assert rc == 1 and 'exit code 0' in out and ': stopped' in out
  assert runs_lib.read_run(root, 'linear', '0').status == 'stopped'
  monkeypatch.delenv('FAKE_STOP_AT')

  rc, out = _run([f'--workdir={root}'], capsys)
  assert rc == 1  # bad_lr fails
  states = {(r.variant, r.seed): r.status for r in runs_lib.discover(root)[1]}
  assert states == {('linear', '0'): 'done', ('linear', '1'): 'done',
                    ('mlp2x_gelu', '0'): 'done', ('mlp2x_gelu', '1'): 'done',
                    ('bad_lr', '0'): 'failed'}
  # The resumed run continued from step 2 rather than starting over.
  steps = [m['step'] for m in runs_lib.read_run(root, 'linear', '0').split('train')]
  assert steps == [1, 2, 3, 4]
  argv = json.load(open(os.path.join(root, 'linear', '1', 'argv.0.json')))
  assert f'--workdir={root}/linear/1' in argv
  assert '--config.model.projector.kind=linear' in argv and '--config.train.seed=1' in argv
  assert 'loss is nan' in open(os.path.join(root, 'bad_lr', '0', 'log.txt')).read()
  sweep_json = json.load(open(os.path.join(root, 'sweep.json')))
  assert [v['name'] for v in sweep_json['variants']] == ['linear', 'mlp2x_gelu', 'bad_lr']
  assert sweep_json['base_config']['model.projector.kind'] == 'mlp2x_gelu'

  # Second call: finished runs are skipped (not relaunched), only the failed one reruns.
  before = _mtimes(root)
  rc, out = _run([f'--workdir={root}'], capsys)
  after = _mtimes(root)
  assert out.count('done: skipped') == 4
  changed = [p for p in after if after[p] != before[p]]
  assert changed == [os.path.join(root, 'bad_lr', '0', 'launch.json')]


def test_runs_made_with_another_config_are_flagged_not_reused(tmp_path, capsys):
  root = str(tmp_path / 'sw')
  rc, _ = _run([f'--workdir={root}', '--only=linear'], capsys)
  assert rc == 0
  before = _mtimes(root)
  # The experiment changed after the runs finished: they are not results of it any more.
  rc, out = _run([f'--workdir={root}', '--only=linear', '--set=optimizer.warmup_steps=3'],
                 capsys)
  assert rc == 1 and 'done: skipped' not in out
  assert out.count('made with another config (ran -> now: optimizer.warmup_steps: 1 -> 3)') == 2
  assert _mtimes(root) == before


def test_dry_run_prints_diffs_and_commands_and_writes_nothing(tmp_path, capsys):
  root = str(tmp_path / 'sw')
  rc, out = _run([f'--workdir={root}', '--dry_run', '--set=optimizer.warmup_steps=2'], capsys)
  assert rc == 0 and not os.path.exists(root)
  assert "every run, vs the base: optimizer.warmup_steps: 1 -> 2, train.num_steps: 5 -> 4" in out
  assert "diff vs base: model.projector.kind: 'mlp2x_gelu' -> 'linear'" in out
  assert "diff vs base: optimizer.lr: 0.001 -> 10.0" in out
  cmds = [shlex.split(l.strip()[2:]) for l in out.splitlines() if l.strip().startswith('$ ')]
  assert len(cmds) == 5
  assert cmds[0][1:] == [FAKE_MAIN, '--config=configs/tiny.py', f'--workdir={root}/linear/0',
                         '--config.train.num_steps=4', '--config.model.projector.kind=linear',
                         '--config.train.seed=0', '--config.optimizer.warmup_steps=2']


def test_bad_override_fails_before_anything_runs(tmp_path, capsys):
  with pytest.raises(KeyError, match='optimizer.lrr'):
    _run([f'--workdir={tmp_path}/sw', '--set=optimizer.lrr=1'], capsys)
  assert not os.path.exists(tmp_path / 'sw')


def test_local_multi_process_flags(tmp_path, capsys):
  root = str(tmp_path / 'sw')
  rc, _ = _run([f'--workdir={root}', '--only=mlp2x_gelu', '--seeds=0', '--num_processes=2'],
               capsys)
  assert rc == 0
  a0 = json.load(open(os.path.join(root, 'mlp2x_gelu', '0', 'argv.0.json')))
  a1 = json.load(open(os.path.join(root, 'mlp2x_gelu', '0', 'argv.1.json')))
  assert a0[:-3] == a1[:-3]
  coord = [a for a in a0 if a.startswith('--coordinator_address=localhost:')]
  assert len(coord) == 1 and coord[0] in a1
  assert a0[-2:] == ['--num_processes=2', '--process_id=0']
  assert a1[-2:] == ['--num_processes=2', '--process_id=1']
  assert runs_lib.read_run(root, 'mlp2x_gelu', '0').status == 'done'


def test_ctrl_c_stops_the_run_gracefully(tmp_path):
  """SIGINT to the sweep reaches the run as SIGTERM (lvm.main's checkpoint-and-exit), and
  the run is recorded as stopped, to be resumed by the next call."""
  root = str(tmp_path / 'sw')
  env = dict(os.environ, FAKE_HANG='1', PYTHONPATH=sweep_lib.REPO_ROOT)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'experiments.run', FIXTURE, f'--module={FAKE_MAIN}',
       f'--workdir={root}', '--only=linear', '--seeds=0'],
      cwd=sweep_lib.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True,
      # As from a terminal: SIGINT at its default. Under a test run started in the background
      # (`cmd &` in a script) SIGINT is inherited as ignored, and the sweep would never see it.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  started = os.path.join(root, 'linear', '0', 'started')
  deadline = time.time() + 60
  while not os.path.exists(started) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.1)
  assert os.path.exists(started), proc.communicate()[0]
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 130
  assert 'run the same command again to resume' in out and 'Traceback' not in out
  assert os.path.exists(os.path.join(root, 'linear', '0', 'sigterm'))
  run = runs_lib.read_run(root, 'linear', '0')
  assert run.launch['returncode'] is None and run.status == 'stopped'


def test_tpu_dry_run_commands_parse(capsys):
  rc, out = _run(['--workdir=gs://bucket/sweeps/fx', '--launcher=tpu', '--dry_run',
                  '--tpu_name=pod-1', '--tpu_zone=us-east5-a', '--set=mesh.fsdp=4'], capsys)
  assert rc == 0
  lines = [l for l in out.splitlines() if l.startswith('gcloud ')]
  assert len(lines) == 5
  argv = shlex.split(lines[0])
  assert argv[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1', '--zone=us-east5-a']
  assert '--worker=all' in argv
  remote = [a for a in argv if a.startswith('--command=')][0][len('--command='):]
  cd, _, cmd = remote.partition(' && ')
  assert cd == 'cd ~/lvm'
  inner = shlex.split(cmd)
  assert inner[:4] == ['python3', FAKE_MAIN, '--config=configs/tiny.py',
                       '--workdir=gs://bucket/sweeps/fx/linear/0']
  assert '--config.model.projector.kind=linear' in inner and '--config.mesh.fsdp=4' in inner
  assert not any(a.startswith('--process_id') for a in inner)  # the pod auto-detects


def test_tpu_placeholders_stay_expandable(capsys):
  _, out = _run(['--workdir=gs://b/x', '--launcher=tpu', '--dry_run', '--only=linear'], capsys)
  line = [l for l in out.splitlines() if l.startswith('gcloud ')][0]
  assert line.startswith('gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ')
  env = dict(os.environ, TPU_NAME='my-pod', ZONE='europe-west4-a')
  echoed = subprocess.run(['bash', '-c', 'printf "%s\\n" ' + line[len('gcloud '):]],
                          env=env, capture_output=True, text=True, check=True).stdout
  assert echoed.splitlines()[4:6] == ['my-pod', '--zone=europe-west4-a']


def test_slurm_script_runs_one_task_per_node(tmp_path, capsys):
  """The sbatch script, run with stand-ins for scontrol and srun, starts one lvm.main per
  node with the first node as coordinator and SLURM_PROCID as the process id."""
  root = str(tmp_path / 'sw')
  rc, out = _run([f'--workdir={root}', '--launcher=slurm', '--dry_run', '--only=linear',
                  '--seeds=0', '--nodes=2', '--gpus_per_node=4', '--partition=gpu',
                  f'--python={sys.executable}'], capsys)
  assert rc == 0
  script = out[out.index('#!/bin/bash'):]
  script = script[:script.index('\n\n') + 1] if '\n\n' in script else script
  for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=4',
               '#SBATCH --partition=gpu'):
    assert line in script
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'scontrol').write_text('#!/bin/bash\nprintf "node-a\\nnode-b\\n"\n')
  # srun stand-in: run the task once per node, as SLURM would, with its env.
  (bin_dir / 'srun').write_text(
      '#!/bin/bash\nshift 2\nfor i in 0 1; do SLURM_PROCID=$i SLURM_NTASKS=2 "$@" || exit 1; '
      'done\n')
  for f in bin_dir.iterdir():
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
  path = tmp_path / 'job.sbatch'
  path.write_text(script)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
             SLURM_JOB_NODELIST='node-[a-b]')
  subprocess.run(['bash', str(path)], env=env, check=True, capture_output=True)
  for i in (0, 1):
    argv = json.load(open(os.path.join(root, 'linear', '0', f'argv.{i}.json')))
    assert argv[-3:] == ['--coordinator_address=node-a:12345', '--num_processes=2',
                         f'--process_id={i}']
    assert '--config.model.projector.kind=linear' in argv
  assert runs_lib.read_run(root, 'linear', '0').status == 'done'


def test_slurm_submits_one_script_per_unfinished_run(tmp_path, capsys, monkeypatch):
  root = str(tmp_path / 'sw')
  _run([f'--workdir={root}', '--only=linear', '--seeds=0'], capsys)  # one run already done
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'sbatch.log'
  (bin_dir / 'sbatch').write_text(f'#!/bin/bash\necho "$@" >> {log}\necho Submitted\n')
  (bin_dir / 'sbatch').chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  rc, out = _run([f'--workdir={root}', '--launcher=slurm', '--nodes=2'], capsys)
  assert rc == 0 and 'done: skipped' in out
  submitted = log.read_text().split()
  expected = [os.path.join(root, v, s, 'job.sbatch')
              for v, s in (('linear', '1'), ('mlp2x_gelu', '0'), ('mlp2x_gelu', '1'),
                           ('bad_lr', '0'))]
  assert submitted == expected
  assert '#SBATCH --nodes=2' in open(expected[0]).read()


def test_experiment_names_resolve():
  assert sweep_lib.load_sweep(FIXTURE).name == 'fixture'
  with pytest.raises(SystemExit):
    run_lib.main([FIXTURE, '--launcher=gke', '--workdir=/tmp/x'])


def test_launchers_quote_every_interpolated_value(tmp_path):
  """Issue 27 item 10: a `;` or a space in --repo_dir or the workdir never runs as a shell
  command on the workers, and the sbatch output path stays one argument."""
  from experiments import launchers  # pylint: disable=g-import-not-at-top
  tpu = launchers.TpuLauncher(name='pod', zone='z', repo_dir='/opt/my lvm; touch HACKED')
  remote = tpu.remote_command(['python3', '-m', 'lvm.main'])
  env = dict(os.environ, HOME=str(tmp_path))
  # Run only the `cd` part in a shell: it must fail on the missing folder, and run nothing.
  cd = remote.partition(' && ')[0]
  proc = subprocess.run(['bash', '-c', cd], cwd=tmp_path, env=env, capture_output=True)
  assert proc.returncode != 0 and not (tmp_path / 'HACKED').exists()
  assert shlex.split(cd) == ['cd', '/opt/my lvm; touch HACKED']
  # `~/` still expands on the worker.
  home = launchers.TpuLauncher(repo_dir='~/my lvm').remote_command(['true'])
  (tmp_path / 'my lvm').mkdir()
  out = subprocess.run(['bash', '-c', home.replace('&& true', '&& pwd')], env=env,
                       capture_output=True, text=True, check=True).stdout.strip()
  assert out == str(tmp_path / 'my lvm')

  slurm = launchers.SlurmLauncher(partition='gpu', extra_sbatch=('--qos=high', '--exclusive'))
  script = slurm.script(['python', '-m', 'lvm.main'], 'job', '/runs/my sweep/a')
  assert '#SBATCH --output="/runs/my sweep/a/slurm-%j.out"' in script
  assert '#SBATCH --partition=gpu' in script and '#SBATCH --qos=high' in script
  assert '#SBATCH --exclusive' in script
  with pytest.raises(ValueError, match='newline'):
    slurm.script(['python'], 'job', '/runs/a\n#SBATCH --uid=0')
  with pytest.raises(ValueError, match='newline'):
    launchers.SlurmLauncher(account='x"y').script(['python'], 'job', '/runs/a')
