"""Model-side anyres layout: an image's tile features -> its packed visual token sequence.

Matches transformers' `LlavaNextModel.pack_image_features` and
`LlavaOnevisionModel.pack_image_features` (with `get_anyres_image_grid_shape` and
`unpad_image` of `modeling_llava_next.py`), and the token counts that `LlavaNextProcessor` /
`LlavaOnevisionProcessor` insert (`_get_number_of_features`, `replace_image_token`).

The packed sequence of one image, tower features `float[T, P, D]` (tile 0 the base image,
tiles 1.. the grid in row-major order, P = n * n patch tokens per tile, CLS already dropped):

  base tile's P tokens, then the grid's features arranged as one `rows*n x cols*n` map,
  "unpadded" (the rows or columns that came from the black padding removed, as `unpad_image`
  rounds: `new = int(round(side * scale, 7))`, then `(current - new) // 2` removed from EACH
  end, so an odd difference keeps one padded row/column), [OneVision only: bilinearly
  downscaled (`F.interpolate(mode='bilinear', align_corners=False)`, output size
  `int(side // ratio)`) when `ratio = sqrt(rows * cols / (N * n * n)) > 1.1` for
  `vision_aspect_ratio='anyres_max_N'`], read row by row with one `image_newline` after EVERY
  row (the last included); the base tile gets no newline. An image that is not tiled (T = 1:
  OneVision's multi-image samples) packs to its P tokens plus one newline.

Static formulation (jit once per (max tiles, tile tokens, max length, taps)): each output
position k of a `max_len` buffer is

  out[k] = sum_j weight[k, j] * features.reshape(T * P, D)[index[k, j]]
           + newline[k] * image_newline

with host-made tables (`pack_table`, numpy, from the image size only): `index int32[L, K]`,
`weight float32[L, K]`, `newline float32[L]` and the true `length`. K = 1 (a copy, weight 1)
for LLaVA-NeXT; K = 4 (the bilinear taps) for OneVision, whose positions without downscaling
use one tap of weight 1. Positions `>= length` have zero weights and give zero vectors. Zero
(unused) tiles are never read. Cost: K gathers of `[L, D]` (copies, no matmuls). Tables for a
batch stack to `[B, N, L, K]` and `pack` is `jax.vmap`ped over the leading axes.

A row's N packed buffers `float[N, L, D]` hold its visual tokens with gaps (each image's
`length` tokens, then zeros); `stream_index(lengths, L, S)` gathers them into one gapless
stream `float[S, D]`, the k-th visual token of the row at k, the order in which the row's
image-token ids appear (what `lvm.models.llava.merge_visual_tokens` takes).
"""

import math
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from lvm.data.anyres import check_pinpoints, select_best_resolution


def parse_vision_aspect_ratio(vision_aspect_ratio: str | None) -> int | None:
  """'anyres_max_9' -> 9 (OneVision's feature budget in tiles); None or 'anyres' -> None."""
  if vision_aspect_ratio in (None, 'anyres'):
    return None
  prefix = 'anyres_max_'
  if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
    raise ValueError(f"vision_aspect_ratio must be 'anyres' or 'anyres_max_N', "
                     f'got {vision_aspect_ratio!r}')
  return int(vision_aspect_ratio[len(prefix):])


def unpad_box(image_size: Sequence[int], grid: Sequence[int],
              n: int) -> tuple[int, int, int, int]:
  """(top, left, rows, cols) of the unpadded part of the `grid` tiles' feature map.

  Args:
    image_size: original (height, width) in pixels.
    grid: (grid rows, grid cols) of tiles.
    n: patches per tile side (tower image size // patch size).
  """
  h, w = int(image_size[0]), int(image_size[1])
  ch, cw = grid[0] * n, grid[1] * n
  if w / h > cw / ch:
    new_h = int(round(h * (cw / w), 7))
    pad = (ch - new_h) // 2
    return pad, 0, ch - 2 * pad, cw
  new_w = int(round(w * (ch / h), 7))
  pad = (cw - new_w) // 2
  return 0, pad, ch, cw - 2 * pad


def downscaled_shape(rows: int, cols: int, n: int, max_num_patches: int | None) -> tuple[int, int]:
  """OneVision's feature map size after its anyres_max_N rule (unchanged if ratio <= 1.1)."""
  if max_num_patches is None:
    return rows, cols
  ratio = math.sqrt(rows * cols / (max_num_patches * n**2))
  if ratio > 1.1:
    return int(rows // ratio), int(cols // ratio)
  return rows, cols


def patches_per_side(tile_size: int, patch_size: int) -> int:
  """n: feature rows (and columns) per tile, `tile_size // patch_size` as transformers has it.

  Not necessarily exact: SigLIP-so400m's 384 px tiles of 14 px patches give 27 (its patch
  convolution drops the last 6 pixels).
  """
  if not 0 < patch_size <= tile_size:
    raise ValueError(f'patch size {patch_size} does not fit the tower image size {tile_size}')
  return tile_size // patch_size


def _grid_layout(image_size, pinpoints, tile_size, n, max_num_patches):
  ph, pw = select_best_resolution(image_size, pinpoints)
  grid = ph // tile_size, pw // tile_size
  box = unpad_box(image_size, grid, n)
  return grid, box, downscaled_shape(box[2], box[3], n, max_num_patches)


def num_image_tokens(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]],
                     tile_size: int, patch_size: int, max_num_patches: int | None = None,
                     tiled: bool = True) -> int:
  """Visual tokens of one image: what transformers' processor inserts for it.

  Args:
    image_size: original (height, width).
    pinpoints: `image_grid_pinpoints` ((height, width) pairs, multiples of `tile_size`).
    tile_size, patch_size: the tower's image size and the pixels per output feature (its
      patch size, times any pooling of the projector).
    max_num_patches: N of OneVision's `vision_aspect_ratio='anyres_max_N'`; None for LLaVA-NeXT.
    tiled: False for an image that is not tiled (OneVision's multi-image samples).
  """
  n = patches_per_side(tile_size, patch_size)
  if not tiled:
    return n * n + 1
  _, _, (rows, cols) = _grid_layout(image_size, pinpoints, tile_size, n, max_num_patches)
  return n * n + rows * cols + rows


def max_image_tokens(pinpoints: Sequence[Sequence[int]], tile_size: int, patch_size: int,
                     max_num_patches: int | None = None) -> int:
  """An upper bound of `num_image_tokens` over all image sizes (the static buffer length).

  Exact over every unpadded map the grids allow (full height with any width, or full width
  with any height), a superset of what images produce.
  """
  check_pinpoints(pinpoints, tile_size)
  n = patches_per_side(tile_size, patch_size)
  best = n * n + 1
  for ph, pw in pinpoints:
    ch, cw = ph // tile_size * n, pw // tile_size * n
    shapes = [(r, cw) for r in range(1, ch + 1)] + [(ch, c) for c in range(1, cw + 1)]
    for r, c in shapes:
      r, c = downscaled_shape(r, c, n, max_num_patches)
      best = max(best, n * n + r * c + r)
  return best


class PackTable(NamedTuple):
  """Host-made gather tables of one image (see the module docstring)."""
  index: np.ndarray    # int32[L, K]: rows of features.reshape(T * P, D)
  weight: np.ndarray   # float32[L, K]
  newline: np.ndarray  # float32[L]: 1 where the image_newline goes
  length: int          # true number of tokens (<= L)


def _bilinear_taps(size_in: int, size_out: int):
  """torch's bilinear (align_corners=False, no antialias) source indices and weights per output.

  The scale is `in / out` in float32; the source coordinate `scale * (dst + 0.5) - 0.5` is
  rounded once to float32 (torch's CPU kernel gets it by a fused multiply-add: rounding the
  product first moves some weights by 1e-6), clamped at 0.
  """
  scale = np.float64(np.float32(size_in) / np.float32(size_out))
  src = (scale * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, size_in - 1)
  w1 = src - i0.astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def pack_table(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int,
               patch_size: int, max_len: int, max_num_patches: int | None = None,
               tiled: bool = True, taps: int | None = None) -> PackTable:
  """The gather tables that `pack` turns into this image's token sequence.

  Args:
    image_size, pinpoints, tile_size, patch_size, max_num_patches, tiled: as `num_image_tokens`.
    max_len: the static buffer length (e.g. `max_image_tokens(...)`).
    taps: K; default 4 when `max_num_patches` is set (OneVision), else 1. Every image of a
      batch must use the same K.
  """
  n = patches_per_side(tile_size, patch_size)
  taps = taps or (4 if max_num_patches is not None else 1)
  index = np.zeros((max_len, taps), np.int32)
  weight = np.zeros((max_len, taps), np.float32)
  newline = np.zeros((max_len,), np.float32)
  base = n * n
  length = num_image_tokens(image_size, pinpoints, tile_size, patch_size, max_num_patches, tiled)
  if length > max_len:
    raise ValueError(f'image of size {tuple(image_size)} packs to {length} tokens, more than '
                     f'the buffer of {max_len}')
  index[:base, 0] = np.arange(base)
  weight[:base, 0] = 1
  if not tiled:
    newline[base] = 1
    return PackTable(index, weight, newline, length)
  grid, (top, left, rows, cols), (out_r, out_c) = _grid_layout(
      image_size, pinpoints, tile_size, n, max_num_patches)

  def flat(y, x):  # Position in the unpadded map -> row of features.reshape(T * P, D).
    y, x = y + top, x + left
    return (1 + (y // n) * grid[1] + x // n) * base + (y % n) * n + (x % n)

  if (out_r, out_c) == (rows, cols):
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
    src = [flat(ys, xs)]
    wts = [np.ones((rows, cols), np.float32)]
  else:
    if taps < 4:
      raise ValueError('bilinear downscaling needs taps=4')
    y0, y1, wy0, wy1 = _bilinear_taps(rows, out_r)
    x0, x1, wx0, wx1 = _bilinear_taps(cols, out_c)
    src, wts = [], []
    for yy, wy in ((y0, wy0), (y1, wy1)):
      for xx, wx in ((x0, wx0), (x1, wx1)):
        src.append(flat(yy[:, None], xx[None, :]))
        wts.append(wy[:, None] * wx[None, :])
  # Row-major with one extra slot per row for the newline.
  pos = base + np.arange(out_r)[:, None] * (out_c + 1) + np.arange(out_c)[None, :]
  for j, (s, w) in enumerate(zip(src, wts)):
    index[pos, j] = s
    weight[pos, j] = w
  newline[base + np.arange(out_r) * (out_c + 1) + out_c] = 1
  return PackTable(index, weight, newline, length)


def pack(features: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray, newline: jnp.ndarray,
         image_newline: jnp.ndarray) -> jnp.ndarray:
  """One image's packed visual tokens, zero past its length.

  Args:
    features: float[T, P, D] projected tower features of the tiles (base first, unused zero).
    index: int32[L, K], weight: float[L, K], newline: float[L]: its `pack_table`.
    image_newline: float[D].

  Returns:
    float[L, D] in the features' dtype (the weighted sum in float32).
  """
  t, p, d = features.shape
  flat = features.reshape(t * p, d)
  out = newline.astype(jnp.float32)[:, None] * image_newline.astype(jnp.float32)
  # One gather of [L, D] per tap, never a [L, K, D] buffer (OneVision: K = 4, L ~ 8.8K).
  for j in range(index.shape[-1]):
    rows = jnp.take(flat, index[:, j], axis=0).astype(jnp.float32)
    out = out + weight[:, j, None].astype(jnp.float32) * rows
  return out.astype(features.dtype)


def stream_index(lengths: jnp.ndarray, max_len: int, size: int) -> jnp.ndarray:
  """Gather indices that concatenate each row's packed images without their padding.

  Args:
    lengths: int[B, N] true token counts of the row's images (0 for an empty slot).
    max_len: L, the packed buffer length of each image.
    size: S, the stream length to produce (e.g. the sequence length).

  Returns:
    int32[B, S]: for the k-th visual token of row b, its row in that row's packed buffers
    reshaped to `[N * L, D]`; past the row's total the index is clamped (a valid row whose
    value the caller masks, as `merge_visual_tokens` does).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  ends = jnp.cumsum(lengths, axis=-1)  # [B, N]
  k = jnp.arange(size, dtype=jnp.int32)
  image = jnp.sum(k[None, :, None] >= ends[:, None, :], axis=-1)  # [B, S]
  image = jnp.minimum(image, lengths.shape[-1] - 1)
  offset = k[None] - jnp.take_along_axis(ends - lengths, image, axis=1)
  return (image * max_len + jnp.clip(offset, 0, max_len - 1)).astype(jnp.int32)
