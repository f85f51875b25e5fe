"""`lvm.main`'s training path with a data source the fault tests control.

  python tests/reliability/driver.py --config=configs/tiny.py --workdir=DIR \
      [--data=pipeline|synthetic] [--poison_step=K --poison=nan|inf] [--config.KEY=V ...]

`--data=synthetic` feeds `tests/synthetic_data.py` batches (no dataset to prepare);
`--poison_step=K` really poisons the batch of train step K (1-based): its images become
NaN or Inf, so the loss of step K is not finite (the config must carry images).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder.')
_DATA = flags.DEFINE_enum('data', 'pipeline', ['pipeline', 'synthetic'], 'Batch source.')
_POISON_STEP = flags.DEFINE_integer('poison_step', 0, 'Train step whose batch is poisoned.')
_POISON = flags.DEFINE_enum('poison', 'nan', ['nan', 'inf'], 'Value written into the images.')


class _Poisoned:
  """Wraps a train iterator; the batch of step `poison_step` gets non-finite images."""

  def __init__(self, inner, poison_step, value):
    self.inner, self.poison_step, self.value = inner, poison_step, value
    self._step = 1  # The train step the next batch feeds (restored with the state).

  def __iter__(self):
    return self

  def __next__(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    batch = next(self.inner)
    step = self._step
    self._step += 1
    if step == self.poison_step:
      images = batch['images']
      poisoned = jax.jit(lambda x: jnp.full_like(x, self.value),
                         out_shardings=images.sharding)(images)
      batch = dict(batch, images=poisoned)
      print(f'driver: poisoned the batch of step {step} with {self.value}', flush=True)
    return batch

  def get_state(self):
    return {'inner': self.inner.get_state(), 'step': self._step}

  def set_state(self, state):
    self.inner.set_state(state['inner'])
    self._step = int(state['step'])

  @property
  def stats(self):
    return getattr(self.inner, 'stats', {})


def main(argv):
  del argv
  from lvm import train  # pylint: disable=g-import-not-at-top
  if _DATA.value == 'synthetic':
    import synthetic_data  # pylint: disable=g-import-not-at-top
    base_make, num_examples = synthetic_data.make_iterator, synthetic_data.num_examples
  else:
    base_make, num_examples = train.default_make_iterator, train.default_num_examples
    train.prepare_data(_CONFIG.value)

  def make_iterator(config, split, mesh, *, shuffle=True, num_epochs=None):
    it = base_make(config, split, mesh, shuffle=shuffle, num_epochs=num_epochs)
    if split != config.data.train_split or not _POISON_STEP.value:
      return it
    return _Poisoned(it, _POISON_STEP.value, float(_POISON.value))

  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, make_iterator=make_iterator,
                           num_examples=num_examples)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
