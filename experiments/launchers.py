"""Launchers: turn (variant, seed) runs into `lvm.main` commands for three kinds of machine.

- `local`: runs them one after another on this machine (optionally as N local processes of
  one multi-host job), records `launch.json` (command, pid, exit code) and `log.txt` in
  each run folder, and skips finished runs so that calling it again resumes the sweep.
- `tpu`: one `gcloud compute tpus tpu-vm ssh --worker=all` command per run; every worker
  runs the same `lvm.main`, and `jax.distributed.initialize()` auto-detects the pod.
- `slurm`: one sbatch script per run: one task per node, `srun`, the coordinator is the
  first node of the allocation and the process id is `SLURM_PROCID`.
"""

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Sequence

from experiments import runs as runs_lib
from experiments import sweep as sweep_lib

# Multi-host flags of lvm.main (the arguments of jax.distributed.initialize).
COORDINATOR_FLAG = '--coordinator_address'
NUM_PROCESSES_FLAG = '--num_processes'
PROCESS_ID_FLAG = '--process_id'


def main_command(sweep: sweep_lib.Sweep, variant: sweep_lib.Variant, seed: int, workdir: str,
                 *, python: str = 'python', module: str = 'lvm.main',
                 extra_overrides: dict | None = None) -> list[str]:
  """argv of `python -m lvm.main` for one run: base config, its overrides, its workdir.

  Args:
    extra_overrides: command-line `--set KEY=VALUE`s (e.g. mesh flags), applied last.
  """
  overrides = sweep.overrides_of(variant, seed)
  overrides.update(extra_overrides or {})
  entry = [python, module] if module.endswith('.py') else [python, '-m', module]
  return [*entry, f'--config={sweep.config}', f'--workdir={workdir}',
          *sweep_lib.config_flags(overrides)]


def run_dir(root: str, variant: sweep_lib.Variant, seed: int) -> str:
  return runs_lib.join(root, variant.name, str(seed))


@dataclasses.dataclass
class LocalLauncher:
  """Runs the sweep here, one run after another.

  Attributes:
    num_processes: > 1 starts that many local processes per run, wired as one multi-host
      job through a coordinator on localhost (what a pod does, on one machine).
    port: coordinator port for num_processes > 1.
    env: extra environment variables for the runs.
    grace_seconds: on interrupt, how long the run may take to checkpoint before it is killed.
  """
  num_processes: int = 1
  port: int = 0
  env: dict | None = None
  grace_seconds: float = 120.0

  def process_commands(self, command: list[str], port: int) -> list[list[str]]:
    if self.num_processes <= 1:
      return [command]
    return [command + [f'{COORDINATOR_FLAG}=localhost:{port}',
                       f'{NUM_PROCESSES_FLAG}={self.num_processes}',
                       f'{PROCESS_ID_FLAG}={i}'] for i in range(self.num_processes)]

  def launch(self, workdir: str, command: list[str], log=print) -> int:
    """Runs one run to its end; returns its exit code (the first non-zero of its processes)."""
    os.makedirs(workdir, exist_ok=True)
    port = self.port or _free_port()
    commands = self.process_commands(command, port)
    env = dict(os.environ, **(self.env or {}))
    record = {'command': commands if len(commands) > 1 else command,
              'host': socket.gethostname(), 'pid': os.getpid(), 'start_time': time.time(),
              'returncode': None}
    runs_lib.write_text(os.path.join(workdir, runs_lib.LAUNCH_FILE), json.dumps(record, indent=1))
    log(f'  log: {os.path.join(workdir, runs_lib.LOG_FILE)}')
    procs, logs = [], []
    try:
      for i, cmd in enumerate(commands):
        name = runs_lib.LOG_FILE if i == 0 else f'log.{i}.txt'
        f = open(os.path.join(workdir, name), 'a', encoding='utf-8')
        f.write(f'\n$ {shlex.join(cmd)}\n')
        f.flush()
        logs.append(f)
        # From the repository root: configs are named relative to it, as in the docs.
        # Own session: a Ctrl-C reaches only this launcher, which then asks the run to
        # stop the way a preemption does (SIGTERM: lvm.main saves a checkpoint and exits).
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                      cwd=sweep_lib.REPO_ROOT, start_new_session=True))
      codes = _wait_all(procs)
    except BaseException:
      log(f'  interrupted: stopping the run (SIGTERM, up to {self.grace_seconds}s to save)')
      _stop_all(procs, self.grace_seconds)
      record.update(returncode=None, end_time=time.time(), pid=-1)
      runs_lib.write_text(os.path.join(workdir, runs_lib.LAUNCH_FILE),
                          json.dumps(record, indent=1))
      raise
    finally:
      for f in logs:
        f.close()
    rc = next((c for c in codes if c != 0), 0)
    record.update(returncode=rc, end_time=time.time(), process_returncodes=codes)
    runs_lib.write_text(os.path.join(workdir, runs_lib.LAUNCH_FILE), json.dumps(record, indent=1))
    return rc


def _wait_all(procs: Sequence[subprocess.Popen], poll: float = 0.5) -> list[int]:
  """Waits for every process; if one fails, the others (stuck in a collective) are killed."""
  while True:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
      return codes
    if any(c not in (None, 0) for c in codes):
      time.sleep(5)  # let the others write their last words, then stop them
      for p in procs:
        if p.poll() is None:
          p.kill()
      return [p.wait() for p in procs]
    time.sleep(poll)


def _stop_all(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.time() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class TpuLauncher:
  """gcloud commands that run one lvm.main on every worker of a TPU pod slice.

  Attributes:
    name, zone, project: the TPU VM (`gcloud compute tpus tpu-vm create NAME ...`).
    repo_dir: the lvm checkout on every worker (copied there beforehand; see the docs).
    python: the interpreter on the workers.
  """
  name: str = '$TPU_NAME'
  zone: str = '$ZONE'
  project: str = ''
  repo_dir: str = '~/lvm'
  python: str = 'python3'

  def remote_command(self, command: list[str]) -> str:
    # No multi-host flags: on a pod jax.distributed.initialize() finds the coordinator and
    # this worker's id from the TPU metadata by itself.
    return f'cd {_shell_path(self.repo_dir)} && {shlex.join(command)}'

  def command(self, command: list[str]) -> str:
    parts = ['gcloud compute tpus tpu-vm ssh', _shell_word(self.name),
             f'--zone={_shell_word(self.zone)}']
    if self.project:
      parts.append(f'--project={_shell_word(self.project)}')
    parts += ['--worker=all', '--command=' + shlex.quote(self.remote_command(command))]
    return ' '.join(parts)


def _shell_word(x: str) -> str:
  """Quotes `x` for the shell, leaving a `$VAR` placeholder for the shell to expand."""
  if x.startswith('$') and x[1:].replace('_', '').isalnum():
    return f'"{x}"'
  return shlex.quote(x)


def _shell_path(path: str) -> str:
  """Quotes a path for the shell; a leading `~/` stays outside the quotes so the remote
  shell still expands it to the worker's home."""
  if path == '~':
    return path
  if path.startswith('~/'):
    return '~/' + shlex.quote(path[2:])
  return _shell_word(path)


def _sbatch_line(option: str, value=None) -> str:
  """`#SBATCH --option=value` (or `#SBATCH --flag` without a value). A value with spaces
  or other shell characters is double-quoted: sbatch strips the quotes, so it stays one
  argument; a newline or a double quote
  could start a new directive or end the quoting early, and is refused."""
  for part in (option, '' if value is None else str(value)):
    if any(c in part for c in '\n\r"'):
      raise ValueError(f'sbatch option {option}={value!r} contains a newline or a double quote')
  if not option.startswith('-') or any(c.isspace() for c in option):
    raise ValueError(f'sbatch option {option!r} must be one word starting with -')
  if value is None:
    return f'#SBATCH {option}'
  value = str(value)
  plain = value and all(c.isalnum() or c in '_.,:/%@+=-' for c in value)
  return f'#SBATCH {option}={value}' if plain else f'#SBATCH {option}="{value}"'


@dataclasses.dataclass
class SlurmLauncher:
  """sbatch scripts for a GPU cluster: one task per node, each task owning the node's GPUs.

  Attributes:
    nodes: nodes per run.
    gpus_per_node: GPUs each task sees (`--gpus-per-node`).
    partition, account, time: sbatch options ('' leaves them to the cluster's defaults).
    repo_dir: the lvm checkout, on a filesystem every node shares.
    python: the interpreter on the nodes (e.g. a venv's bin/python).
    port: coordinator port on the first node.
    extra_sbatch: further `#SBATCH` lines, e.g. ('--qos=high',).
  """
  nodes: int = 1
  gpus_per_node: int = 8
  partition: str = ''
  account: str = ''
  time: str = '24:00:00'
  repo_dir: str = ''
  python: str = 'python'
  port: int = 12345
  cpus_per_task: int = 0
  extra_sbatch: Sequence[str] = ()

  def script(self, command: list[str], job_name: str, workdir: str) -> str:
    lines = ['#!/bin/bash', _sbatch_line('--job-name', job_name),
             _sbatch_line('--nodes', int(self.nodes)), '#SBATCH --ntasks-per-node=1',
             _sbatch_line('--gpus-per-node', int(self.gpus_per_node)),
             _sbatch_line('--output', f'{workdir}/slurm-%j.out')]
    if self.cpus_per_task:
      lines.append(_sbatch_line('--cpus-per-task', int(self.cpus_per_task)))
    for option, value in (('--time', self.time), ('--partition', self.partition),
                          ('--account', self.account)):
      if value:
        lines.append(_sbatch_line(option, value))
    for extra in self.extra_sbatch:  # '--qos=high' or '--exclusive'
      option, sep, value = extra.partition('=')
      lines.append(_sbatch_line(option, value if sep else None))
    repo = self.repo_dir or sweep_lib.REPO_ROOT
    # Every task runs the same command; the per-task id is expanded inside the task, so
    # the inner command is single-quoted for `bash -c`.
    inner = (f'{shlex.join(command)} {COORDINATOR_FLAG}="$COORDINATOR" '
             f'{NUM_PROCESSES_FLAG}="$SLURM_NTASKS" {PROCESS_ID_FLAG}="$SLURM_PROCID"')
    lines += [
        'set -euo pipefail',
        f'cd {shlex.quote(repo)}',
        f'mkdir -p {shlex.quote(workdir)}',
        '# The first node of the allocation hosts the jax.distributed coordinator. awk reads',
        '# the whole list: `head -n 1` could exit first and, under pipefail, scontrol\'s',
        '# SIGPIPE (status 141) would fail the job.',
        'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\'):'
        f'{self.port}"',
        'export COORDINATOR',
        f'srun --nodes={int(self.nodes)} --ntasks-per-node=1 bash -c {shlex.quote(inner)}',
    ]
    return '\n'.join(lines) + '\n'


def python_executable() -> str:
  """The interpreter running this sweep, so local runs use the same venv."""
  return sys.executable or 'python'
