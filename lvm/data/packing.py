"""Multimodal sequence packing: several samples per row, each with its images.

With `config.data.packing` on, a training row holds consecutive samples of its stream (the
row's positions r, r + B, r + 2B, ... as in `lvm.data.pipeline`) for as long as the next one
fits: its tokens in the `data.seq_len` left and its images in the row's image slots
(`data.pack_max_images`; 0 = one image's worth of tokens per slot, `pack_image_slots`). The
first sample that does not fit is not consumed: the row's cursor stays on it and the next
batch's row starts with it. So the state is still one cursor per row, and every guarantee of
the pipeline holds unchanged (process-count independence, exact resume, counted skips).
Only the text is tokenized to decide the fit; images are decoded for the samples taken.

A packed row (L = seq_len, N = image slots):
  input_ids int32[L], loss_mask bool[L], attention_mask bool[L] (False on padding),
  segment_ids int32[L] (1, 2, ... per sample, 0 on padding),
  positions int32[L] (RoPE positions restarting at 0 in each sample),
  images float32[N, H, W, 3] (the samples' images in order, unused slots zero).
The model keeps attention within a segment (`Decoder._masks`), and the image tokens of the
row, in order, take its images in order (`merge_visual_tokens`). A segment's first token is
never a target (as a row's first token is not), so each sample's scored tokens, and with
positions and segments its logits, are those it has alone in a row.
"""

import collections
from typing import Callable

import numpy as np

from lvm.data import images as images_lib
from lvm.data import templates

BATCH_KEYS = ('images', 'input_ids', 'loss_mask', 'attention_mask', 'segment_ids', 'positions')


def pack_image_slots(config, tokens_per_image: int) -> int:
  """Image slots of a packed row: `data.pack_max_images`, or (0) as many images as the row's
  tokens could hold, and never fewer than one sample's `data.max_images`."""
  d = config.data
  if d.pack_max_images:
    return int(d.pack_max_images)
  if not d.max_images:
    return 0
  return max(int(d.max_images), int(d.seq_len) // max(int(tokens_per_image), 1))


def check_config(config, problems, tokens_per_image=None):
  """The packing keys' problems (lvm.validate calls it with the config's problems)."""
  d = config.data
  packing, slots = d.get('packing'), d.get('pack_max_images')
  if not isinstance(packing, bool):
    problems.add('data.packing', f'must be True or False, got {packing!r}',
                 'True packs several samples per training row')
  if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
    problems.add('data.pack_max_images', f'must be an integer >= 0, got {slots!r}',
                 '0 gives a row as many image slots as its tokens can hold')
    return
  if packing is not True:
    return
  max_images = d.get('max_images')
  if slots and isinstance(max_images, int) and slots < max_images:
    problems.add('data.pack_max_images',
                 f'{slots} image slots cannot hold one sample of data.max_images={max_images} '
                 'images: a packed row must fit any single sample',
                 f'set data.pack_max_images >= {max_images} (or 0 for the tokens\' worth)')
  if config.model.get('anyres') and config.model.anyres.get('pinpoints'):
    problems.add('data.packing', 'anyres models (model.anyres.pinpoints) are not packed yet: '
                 'their images are tiles of data-dependent count',
                 'set data.packing=False for anyres runs')
  if d.get('group_by_modality_length'):
    problems.add('data.group_by_modality_length',
                 'length grouping is the alternative to packing, not an addition to it',
                 'turn one of data.packing and data.group_by_modality_length off')


def make(config, processor, tokens_per_image: int, train: bool):
  """The pipeline's packer: on the training split when `data.packing`, else None."""
  if not (train and config.data.packing):
    return None
  return Packer(processor, pack_image_slots(config, tokens_per_image))


class Packer:
  """Fills packed rows from a stream of records (the pipeline's hook, see module doc)."""

  def __init__(self, processor, num_slots: int):
    self.processor, self.num_slots = processor, int(num_slots)
    self.seq_len = processor.seq_len

  def fill_row(self, read: Callable[[int], dict | None], cursor: int, max_drops: int,
               too_many_drops: Callable[[Exception, collections.Counter], Exception],
               taken: list[int] | None = None):
    """(packed row or None, new cursor, Counter of drops) starting at `cursor`.

    Args:
      read: cursor -> the record at that place of the row's stream (None past its end).
      cursor: the row's cursor.
      max_drops: unusable samples in a row after which the split is declared unusable.
      too_many_drops: (last error, drops) -> the exception to raise then.
      taken: if given, the cursor of each sample packed into the row is appended to it.
    """
    drops = collections.Counter()
    samples, tokens, images = [], 0, 0
    while True:
      record = read(cursor)
      if record is None:
        break
      try:
        ids, mask, encoded = self.processor.text(record)
      except templates.SampleError as e:
        cursor += 1
        drops[e.reason] += 1
        if sum(drops.values()) > max_drops:
          raise too_many_drops(e, drops) from e
        continue
      if samples and (tokens + len(ids) > self.seq_len or images + len(encoded) > self.num_slots):
        break  # not consumed: the next batch's row starts with it
      cursor += 1
      try:
        p = self.processor
        pixels = [images_lib.load(x, p.size, p.aspect, p.mean, p.std) for x in encoded]
      except images_lib.ImageError as e:
        drops[e.reason] += 1
        if sum(drops.values()) > max_drops:
          raise too_many_drops(e, drops) from e
        continue
      samples.append((ids, mask, pixels))
      if taken is not None:
        taken.append(cursor - 1)
      tokens += len(ids)
      images += len(encoded)
    return (self.pack(samples) if samples else None), cursor, drops

  def pack(self, samples) -> dict[str, np.ndarray]:
    """One packed row (see the module doc) of [(ids, loss_mask, [image f32[H, W, 3]])]."""
    row = self.empty()
    start, slot = 0, 0
    for segment, (ids, mask, pixels) in enumerate(samples, start=1):
      end = start + len(ids)
      row['input_ids'][start:end] = ids
      row['loss_mask'][start:end] = mask
      row['loss_mask'][start] = False  # as a row's first token: nothing before it to predict
      row['attention_mask'][start:end] = True
      row['segment_ids'][start:end] = segment
      row['positions'][start:end] = np.arange(len(ids))
      for image in pixels:
        row['images'][slot] = image
        slot += 1
      start = end
    return row

  def empty(self) -> dict[str, np.ndarray]:
    """A padding row: nothing attended or supervised, segment 0 throughout."""
    p = self.processor
    return {'images': np.zeros((self.num_slots, p.size, p.size, 3), np.float32),
            'input_ids': np.full((self.seq_len,), p.tokenizer.pad_id, np.int32),
            'loss_mask': np.zeros((self.seq_len,), bool),
            'attention_mask': np.zeros((self.seq_len,), bool),
            'segment_ids': np.zeros((self.seq_len,), np.int32),
            'positions': np.zeros((self.seq_len,), np.int32)}


def segments_of(row: dict) -> list[slice]:
  """The slices of a packed row's samples, in order (for tests and lvm.data.inspect)."""
  seg = np.asarray(row['segment_ids'])
  return [slice(int(np.argmax(seg == s)), int(len(seg) - np.argmax(seg[::-1] == s)))
          for s in range(1, int(seg.max(initial=0)) + 1)]
