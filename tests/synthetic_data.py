"""A synthetic batch source for training tests (not a data pipeline).

Batches have the structure `lvm.data.pipeline.make_iterator` yields (global arrays
sharded over the batch axes) and depend only on (seed, split, batch index), so any mesh
and any number of processes see the same global batch, and `get_state`/`set_state`
resume exactly.
"""

import zlib

import jax
import numpy as np

from lvm import models
from lvm import sharding


def global_batch(config, split: str, index: int) -> dict[str, np.ndarray]:
  """The full global batch `index` of `split` as numpy arrays."""
  b, length = config.train.batch_size, config.data.seq_len
  n, size = config.data.max_images, config.model.vision.image_size
  rng = np.random.default_rng([config.train.seed, zlib.crc32(split.encode()), index])
  p = models.num_image_tokens(config)
  vocab = min(config.model.image_token_id, config.model.pad_token_id)
  images = rng.standard_normal((b, n, size, size, 3)).astype(np.float32)
  ids = rng.integers(1, vocab, (b, length)).astype(np.int32)
  ids[:, 1:1 + p * n] = config.model.image_token_id
  lengths = rng.integers(length // 2, length + 1, b)
  real = np.arange(length)[None, :] < lengths[:, None]
  ids = np.where(real, ids, config.model.pad_token_id).astype(np.int32)
  # Supervise the second half of the real tokens (the "answer").
  loss_mask = real & (np.arange(length)[None, :] >= (1 + p * n + lengths[:, None]) // 2 + 4)
  return {'images': images, 'input_ids': ids, 'loss_mask': loss_mask, 'attention_mask': real}


class SyntheticIterator:
  """Iterates global batches; state is the next batch index."""

  def __init__(self, config, split, mesh, num_batches=None):
    self.config, self.split, self.mesh = config, split, mesh
    self.index = 0
    self.num_batches = num_batches
    self.stats = {}

  def __iter__(self):
    return self

  def __next__(self):
    if self.num_batches is not None and self.index >= self.num_batches:
      raise StopIteration
    batch = global_batch(self.config, self.split, self.index)
    self.index += 1
    return {k: jax.make_array_from_callback(v.shape, sharding.batch_sharding(self.mesh, v.ndim),
                                            lambda idx, v=v: v[idx])
            for k, v in batch.items()}

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = int(state['index'])


def make_iterator(config, split, mesh, *, shuffle=True, num_epochs=None):
  del shuffle
  return SyntheticIterator(config, split, mesh, None if num_epochs is None else 2)


def num_examples(config, split):
  del split
  return 4 * config.train.batch_size
