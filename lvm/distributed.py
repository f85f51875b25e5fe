"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Explicit flags (coordinator address, process count, process id) win; otherwise JAX's
own auto-detection runs where it knows the cluster (TPU pods, SLURM, Open MPI); a plain
single process does nothing. On CPU, processes talk through gloo collectives.
"""

import json
import os

from absl import flags
import jax
import numpy as np

COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')
LOCAL_DEVICES = flags.DEFINE_string(
    'local_device_ids', None, 'Comma-separated local device ids this process uses.')


def _cluster_detected() -> bool:
  """Environments where `jax.distributed.initialize()` finds its peers by itself."""
  env = os.environ
  if int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  # Multi-host TPU slices list their workers here.
  return len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None) -> bool:
  """Starts jax.distributed when asked or when a cluster is detected.

  Must run before anything touches jax devices. Returns whether it initialized.
  """
  if coordinator_address or (num_processes and num_processes > 1):
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError('Multi-process runs need --coordinator_address, --num_processes '
                       f'and --process_id (got {coordinator_address!r}, {num_processes!r}, '
                       f'{process_id!r}).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False


def initialize_from_flags() -> bool:
  ids = LOCAL_DEVICES.value
  return initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                    [int(i) for i in ids.split(',')] if ids else None)


def gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (all processes must call it)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  parts = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(p[:n]).decode()) for p, n in zip(parts, np.asarray(sizes))]
