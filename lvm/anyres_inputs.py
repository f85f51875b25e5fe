"""Generation inputs of an anyres model (LLaVA-NeXT / OneVision): tiles, sizes, token runs.

An image for generation is an `AnyresImage`: its tiles `float32[t, S, S, 3]` (base tile
first, `lvm.data.anyres.tiles`, pixel-equal to transformers' processors) and its original
(height, width). `load` makes one from a path, bytes, a PIL image or a uint8 array with the
run's preprocessing; `expand_image_tokens` turns one image-token id per image into the
`lvm.models.num_image_tokens(config, image_size=...)` ids the model expects.

`tile_batch` stacks a batch's images into the model's static layout, `images float32[B, N,
T', S, S, 3]` and `image_sizes int32[B, N, 2]`, with the tile count handled one of two ways:

- padded (`bucket=False`): T' = the config's maximum T; every tile slot goes through the
  tower (`tile_budget` None). One shape per (B, N).
- bucketed (`bucket=True`): T' = the most tiles any image of the batch has, rounded up to a
  power of two (capped at T), and the tower runs on `tile_budget` R slots only: the batch's
  real tiles per group of rows, rounded up to a power of two, times the groups (the batch
  shards). Zero tiles cost nothing in the tower; the number of shapes stays bounded by the
  log2 of T and of B x N x T.

Both give the same logits (tested): unused tiles never reach the packed visual tokens.
"""

from typing import NamedTuple, Sequence

import numpy as np

from lvm.data import anyres as data_anyres
from lvm.data import images as images_lib


class AnyresImage(NamedTuple):
  """One image's tiles float32[t, S, S, 3] (base first) and original (height, width)."""
  tiles: np.ndarray
  size: tuple[int, int]


def load(config, image) -> AnyresImage:
  """A path, bytes, PIL image or uint8[H, W, 3] -> its tiles, as the run preprocesses them.

  Uses `config.model.anyres.pinpoints`, `config.model.vision.image_size` and
  `config.data.image_mean` / `image_std` (set them to the checkpoint processor's values).

  Raises:
    ImageError: as `lvm.data.images.open_image`.
  """
  im = images_lib.open_image(image)
  tiles = data_anyres.tiles(im, config.model.anyres.pinpoints,
                            int(config.model.vision.image_size), config.data.image_mean,
                            config.data.image_std)
  return AnyresImage(tiles, (im.height, im.width))


def expand_image_tokens(ids: Sequence[int], counts: Sequence[int],
                        image_token_id: int) -> list[int]:
  """Replaces the k-th image-token id of `ids` with `counts[k]` of them.

  Raises:
    ValueError: the number of image-token ids is not the number of counts.
  """
  found = sum(1 for t in ids if t == image_token_id)
  if found != len(counts):
    raise ValueError(f'{found} image tokens (id {image_token_id}) for {len(counts)} images')
  out, k = [], 0
  for t in ids:
    if t == image_token_id:
      out.extend([image_token_id] * int(counts[k]))
      k += 1
    else:
      out.append(int(t))
  return out


def row_images(row) -> list[AnyresImage]:
  """One row's images (None, an AnyresImage or a sequence of them) as a list."""
  if row is None:
    return []
  if isinstance(row, AnyresImage):
    return [row]
  return list(row)


def _bucket(n: int, cap: int) -> int:
  return min(1 << max(n - 1, 0).bit_length(), cap)


def tile_batch(images, rows: int, batch: int, lay, max_tiles: int, bucket: bool,
               groups: int = 1):
  """A batch's images in the model's static layout.

  Args:
    images: per row (`rows` of them), None, an `AnyresImage` or a sequence of them.
    rows: the real rows; `batch` >= rows is the padded batch size (a multiple of `groups`).
    lay: the model's `lvm.models.anyres_tables.Layout`.
    max_tiles: T, the config's tile slots per image (`anyres_model.num_tiles`).
    bucket: bucketed tile count and tower budget (True) or padded to T (False).
    groups: groups of rows with their own tile budget share (the batch shards).

  Returns:
    (images float32[B, N, T', S, S, 3], image_sizes int32[B, N, 2], tile_budget int or None),
    or None when no row has an image.

  Raises:
    ValueError: naming the row and image whose tiles do not fit its size or the tower.
  """
  per_row = [row_images(None if images is None else images[r]) for r in range(rows)]
  most = max(len(r) for r in per_row)
  if most == 0:
    return None
  s = lay.tile_size
  for r, row in enumerate(per_row):
    for i, im in enumerate(row):
      if not isinstance(im, AnyresImage):
        raise ValueError(f'Row {r}, image {i}: an anyres model takes AnyresImage tiles '
                         f'(lvm.anyres_inputs.load), got {type(im).__name__}')
      want = 1 + int(np.prod(data_anyres.grid_shape(im.size, lay.pinpoints, s)))
      if im.tiles.shape != (want, s, s, 3):
        raise ValueError(f'Row {r}, image {i}: an image of size {tuple(im.size)} has {want} '
                         f'tiles of [{s}, {s}, 3], got {list(im.tiles.shape)}')
  n = 1 << (most - 1).bit_length()  # image slots: a power of two, as fixed-size models
  used = [[im.tiles.shape[0] for im in row] for row in per_row]
  t = max_tiles
  if bucket:
    t = _bucket(max(max(u, default=0) for u in used), max_tiles)
  out = np.zeros((batch, n, t, s, s, 3), np.float32)
  sizes = np.zeros((batch, n, 2), np.int32)
  for r, row in enumerate(per_row):
    for i, im in enumerate(row):
      out[r, i, :im.tiles.shape[0]] = im.tiles
      sizes[r, i] = im.size
  budget = None
  if bucket:
    per_group = np.zeros(groups, np.int64)
    for r, u in enumerate(used):
      per_group[r * groups // batch] += sum(u)
    budget = _bucket(int(per_group.max()), batch * n * t // groups) * groups
    if budget >= batch * n * t:
      budget = None  # nothing to skip
  return out, sizes, budget
