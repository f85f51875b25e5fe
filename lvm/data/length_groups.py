"""LLaVA's `group_by_modality_length`: batches of similar length, image and text-only apart.

LLaVA-1.5's stage 2 (`--group_by_modality_length True`) samples with its
`LengthGroupedSampler(group_by_modality=True)` (llava/train/llava_trainer.py):
  * a sample's length is the number of whitespace-separated words of all its turns, positive
    when it has an image and negative when it is text-only (`modality_lengths`);
  * each modality is shuffled, cut into megabatches of world_size x batch samples (one global
    batch), and each megabatch sorted by length, longest first;
  * the full megabatches of both modalities are shuffled together, and the two last (partial)
    ones are merged into one final megabatch, sorted by sample index.
A global batch thus holds one modality and similar lengths, so less of it is padding.

Here the megabatch is `config.train.batch_size` (lvm's global batch, accumulation included,
as LLaVA's `train_batch_size * gradient_accumulation_steps * world_size`). LLaVA also splits
each megabatch into per-device chunks of equal token sums; lvm's global batch is one array of
static shape, so which device holds which row changes neither the loss nor the step time, and
that balancing is left out. The order of epoch e is a function of (`data.shuffle_seed`, e)
only: the pipeline's stream, resume and process-count guarantees hold as with its shuffle.
"""

import numpy as np


def sample_length(record, processor) -> int:
  """LLaVA's modality length of a record: +words with images, -words text-only."""
  from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
  turns, images = pipeline.record_turns(record, processor.template, processor.caption_prompt)
  words = sum(len(str(turn['value']).split()) for turn in turns)
  return words if images else -words


def grouped_indices(lengths, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  """LLaVA's `get_length_grouped_indices` for one modality (lengths >= 0): int[n]."""
  lengths = np.asarray(lengths)
  order = rng.permutation(len(lengths))
  megabatches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  # Longest first; a stable sort keeps the shuffled order among equal lengths.
  return np.concatenate([m[np.argsort(-lengths[m], kind='stable')] for m in megabatches]
                        ) if megabatches else np.zeros((0,), np.int64)


def modality_grouped_indices(lengths, batch_size: int, rng: np.random.Generator) -> np.ndarray:
  """LLaVA's `get_modality_length_grouped_indices`: a permutation int[n] of the samples."""
  lengths = np.asarray(lengths, np.int64)
  image = np.flatnonzero(lengths >= 0)
  text = np.flatnonzero(lengths < 0)
  if not len(image) or not len(text):
    return grouped_indices(np.abs(lengths), batch_size, rng)
  image_order = image[grouped_indices(lengths[image], batch_size, rng)]
  text_order = text[grouped_indices(-lengths[text], batch_size, rng)]
  chunks = lambda x: [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
  image_mb, text_mb = chunks(image_order), chunks(text_order)
  last = np.sort(np.concatenate([image_mb[-1], text_mb[-1]]))
  megabatches = image_mb[:-1] + text_mb[:-1]
  megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
  return np.concatenate(megabatches + [last])


class Grouping:
  """The epoch orders of a split (lengths read once, when the iterator is made)."""

  def __init__(self, lengths):
    self.lengths = np.asarray(lengths, np.int64)

  def order(self, seed: int, epoch: int, batch_size: int) -> np.ndarray:
    """The permutation of the split that epoch `epoch` reads."""
    rng = np.random.default_rng([seed, epoch])
    return modality_grouped_indices(self.lengths, batch_size, rng)


def make(config, source, processor, train: bool) -> Grouping | None:
  """The training split's grouping when `data.group_by_modality_length`, else None."""
  if not (train and config.data.group_by_modality_length):
    return None
  return Grouping([sample_length(source[i], processor) for i in range(len(source))])


def check_config(config, problems):
  """The key's problems (lvm.validate calls it)."""
  value = config.data.get('group_by_modality_length')
  if not isinstance(value, bool):
    problems.add('data.group_by_modality_length', f'must be True or False, got {value!r}',
                 "True orders each epoch as LLaVA's --group_by_modality_length")
