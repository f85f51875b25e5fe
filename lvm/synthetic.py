"""Synthetic batches of the data pipeline's shapes, for benchmarks (`lvm.bench`,
`benchmarks/`): random pixels and token ids laid out as a real batch of the config is.

  batch(config, B, L)   one sample per row: its images' tokens, then text to the end; packed
                        rows when `data.packing` is on, anyres rows for an anyres model
  packed_rows           `lvm.data.packing`'s layout of LLaVA-665K-like samples
  anyres_rows           LLaVA-NeXT / OneVision rows: images of several sizes, their tiles
"""

import numpy as np

import lvm.models

# Text tokens of a packed sample: lognormal, median 328 and sigma 0.68, fit to the LLaVA-665K
# stage-2 samples of `benchmarks/host_pipeline.py` (docs/data.md: 576 visual + text tokens,
# p10 726, p50 904, p90 1431 in all).
PACKED_TEXT_MEDIAN, PACKED_TEXT_SIGMA = 328, 0.68


def batch(config, batch_size: int, seq_len: int, seed: int = 0,
          packed: bool | None = None) -> dict[str, np.ndarray]:
  """A batch of the pipeline's shapes: each row starts with its images' tokens, then text.

  Text ids avoid the image and pad ids; the loss covers every text token after the
  first. Returns numpy arrays (images f32[B, N, H, W, 3], input_ids i32[B, L],
  loss_mask / attention_mask bool[B, L]). Packed rows (`packed_rows`) when `packed`, by
  default when `config.data.packing` is on.
  """
  if config.data.get('packing') if packed is None else packed:
    return packed_rows(config, batch_size, seq_len, seed)
  if config.model.anyres.pinpoints:
    return anyres_rows(config, batch_size, seq_len, seed)
  c = config.model
  rng = np.random.default_rng(seed)
  n_img = config.data.max_images
  p = lvm.models.num_image_tokens(config)
  if n_img * p >= seq_len:
    raise ValueError(f'seq_len {seq_len} leaves no room for text after {n_img} x {p} image '
                     'tokens; raise config.data.seq_len')
  size = c.vision.image_size
  images = rng.standard_normal((batch_size, n_img, size, size, 3), dtype=np.float32)
  ids = _text_ids(config, rng, (batch_size, seq_len))
  ids[:, :n_img * p] = c.image_token_id
  loss_mask = np.zeros((batch_size, seq_len), bool)
  loss_mask[:, n_img * p + 1:] = True
  attention_mask = np.ones((batch_size, seq_len), bool)
  return {'images': images, 'input_ids': ids, 'loss_mask': loss_mask,
          'attention_mask': attention_mask}


# Anyres rows' image sizes (height, width) at 336 px tiles, scaled to the model's tile size:
# 4:3 photos both ways (COCO's 640 x 480), 16:9, square, a letter-size page.
ANYRES_SIZES = ((480, 640), (640, 480), (720, 1280), (600, 600), (1100, 850))


def anyres_rows(config, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of an anyres model (LLaVA-NeXT / OneVision): each image a size from
  ANYRES_SIZES, its base and grid tiles in the first of its T tile slots (the rest zero), as
  many image tokens as the model gives that size, then text to the end of the row.

  Adds image_sizes int32[B, N, 2]; images f32[B, N, T, S, S, 3].
  """
  from lvm.data import anyres as data_anyres  # pylint: disable=g-import-not-at-top
  from lvm.models import anyres_model  # pylint: disable=g-import-not-at-top
  c = config.model
  rng = np.random.default_rng(seed)
  lay = anyres_model.layout(c)
  n_img, slots, s = config.data.max_images, anyres_model.num_tiles(c), lay.tile_size
  images = np.zeros((batch_size, n_img, slots, s, s, 3), np.float32)
  sizes = np.zeros((batch_size, n_img, 2), np.int32)
  ids = _text_ids(config, rng, (batch_size, seq_len))
  loss_mask = np.zeros((batch_size, seq_len), bool)
  for r in range(batch_size):
    start = 0
    for i in range(n_img):
      h, w = ANYRES_SIZES[rng.integers(len(ANYRES_SIZES))]
      size = (max(h * s // 336, 1), max(w * s // 336, 1))
      tiles = 1 + int(np.prod(data_anyres.grid_shape(size, lay.pinpoints, s)))
      images[r, i, :tiles] = rng.standard_normal((tiles, s, s, 3), dtype=np.float32)
      sizes[r, i] = size
      count = lay.num_image_tokens(size)
      if start + count + 2 > seq_len:
        raise ValueError(f'seq_len {seq_len} leaves no room for text after an image of '
                         f'{count} tokens; raise config.data.seq_len')
      ids[r, start:start + count] = c.image_token_id
      start += count
    loss_mask[r, start + 1:] = True
  return {'images': images, 'image_sizes': sizes, 'input_ids': ids, 'loss_mask': loss_mask,
          'attention_mask': np.ones((batch_size, seq_len), bool)}


def _text_ids(config, rng, shape) -> np.ndarray:
  c = config.model
  special = {c.image_token_id, c.pad_token_id}
  ids = rng.integers(0, c.decoder.vocab_size, shape, dtype=np.int32)
  for s in special:  # move accidental special ids onto an ordinary one
    ids[ids == s] = min(set(range(len(special) + 1)) - special)
  return ids


def packed_rows(config, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A packed batch (`lvm.data.packing`'s layout) of LLaVA-665K-like samples.

  Each sample is `data.max_images` images' tokens then lognormal text (PACKED_TEXT_*, at
  most what a row holds); as the packer does, a row takes the stream's next samples while
  their tokens fit and their images fit its slots (`packing.pack_image_slots`), and the
  first that does not starts the next row. Adds segment_ids and positions (int32[B, L]);
  images f32[B, slots, H, W, 3] with the unused slots zero.
  """
  from lvm.data import packing  # pylint: disable=g-import-not-at-top
  c = config.model
  rng = np.random.default_rng(seed)
  n_img = config.data.max_images
  p = lvm.models.num_image_tokens(config)
  slots = packing.pack_image_slots(config, p)
  if n_img * p + 2 > seq_len or n_img > slots:
    raise ValueError(f'a sample of {n_img} x {p} image tokens and text does not fit a row of '
                     f'{seq_len} tokens and {slots} image slots')
  size = c.vision.image_size
  rows = {'images': np.zeros((batch_size, slots, size, size, 3), np.float32),
          'input_ids': np.full((batch_size, seq_len), c.pad_token_id, np.int32),
          'loss_mask': np.zeros((batch_size, seq_len), bool),
          'attention_mask': np.zeros((batch_size, seq_len), bool),
          'segment_ids': np.zeros((batch_size, seq_len), np.int32),
          'positions': np.zeros((batch_size, seq_len), np.int32)}

  def sample_length():
    text = int(round(PACKED_TEXT_MEDIAN * np.exp(PACKED_TEXT_SIGMA * rng.standard_normal())))
    return n_img * p + min(max(text, 2), seq_len - n_img * p)

  nxt = sample_length()
  for r in range(batch_size):
    used = images = segment = 0
    while used + nxt <= seq_len and images + n_img <= slots:
      span = slice(used, used + nxt)
      segment += 1
      rows['input_ids'][r, span] = _text_ids(config, rng, (nxt,))
      rows['input_ids'][r, used:used + n_img * p] = c.image_token_id
      rows['loss_mask'][r, used + n_img * p + 1:used + nxt] = True
      rows['attention_mask'][r, span] = True
      rows['segment_ids'][r, span] = segment
      rows['positions'][r, span] = np.arange(nxt)
      rows['images'][r, images:images + n_img] = rng.standard_normal(
          (n_img, size, size, 3), dtype=np.float32)
      used, images, nxt = used + nxt, images + n_img, sample_length()
  return rows
