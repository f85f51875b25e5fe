"""The record every dataset writes: one format, so the pipeline reads any dataset alike."""

import numpy as np


def features():
  """TFDS features of a record: id, encoded images, LLaVA turns, caption, question types."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      'id': tfds.features.Text(),
      'images': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      'conversations': tfds.features.Text(),  # JSON list of LLaVA turns
      'caption': tfds.features.Text(),
      'question_types': tfds.features.Text(),  # JSON list, one per answer
  })
