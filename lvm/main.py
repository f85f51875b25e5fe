"""Trains and evaluates a model as a config says.

  python -m lvm.main --config=configs/shapes.py --workdir=/tmp/shapes
  python -m lvm.main --config=configs/llava15.py:size=7b,stage=pretrain \
      --workdir=gs://bucket/stage1 --config.data.manual_dir=/data/llava

Running it again on the same workdir resumes from the latest checkpoint. Multi-process:
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process
(TPU pods and SLURM are detected without flags).
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from lvm import cli
from lvm import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:args].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}')
  # A workdir that cannot be written (no such bucket, no credentials) fails here, not at the
  # first checkpoint after compiling and training.
  from lvm import checkpoint  # pylint: disable=import-outside-toplevel
  try:
    checkpoint.check_writable(_WORKDIR.value)
  except ValueError as e:
    cli.fail(str(e))
  distributed.initialize_from_flags()
  # Imported after distributed init: nothing may touch the devices before it.
  from lvm import train  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  logging.info('JAX process %d/%d, %d devices (%d local)', jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
