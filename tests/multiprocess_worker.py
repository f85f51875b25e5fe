"""One process of the 2-process training test: prints JSON losses for each mesh.

usage: multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID 'd,f,t;d,f,t'
"""

import json
import sys

from lvm import distributed


def main():
  address, num, pid, meshes = sys.argv[1:5]
  distributed.initialize(address, int(num), int(pid))
  import jax  # pylint: disable=import-outside-toplevel
  import train_utils  # pylint: disable=import-outside-toplevel,import-error
  config = train_utils.tiny_config()
  results = {}
  for spec in meshes.split(';'):
    shape = tuple(int(x) for x in spec.split(','))
    losses, _, _ = train_utils.run_steps(config, train_utils.mesh_for(config, shape,
                                                                      jax.devices()))
    results[spec] = losses
  print(json.dumps({'devices': jax.device_count(), 'processes': jax.process_count(),
                    'losses': results}))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
