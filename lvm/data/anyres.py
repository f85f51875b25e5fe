"""LLaVA-NeXT / LLaVA-OneVision "anyres" preprocessing: an image -> base tile + grid tiles.

Matches transformers' PIL-backend image processors `LlavaNextImageProcessorPil` and
`LlavaOnevisionImageProcessorPil` (what `AutoImageProcessor` returns when torchvision is not
installed, as in lvm's environment; with torchvision installed it returns the torchvision
classes `LlavaNextImageProcessor` / `LlavaOnevisionImageProcessor`, whose uint8 antialiased
bicubic resize differs from Pillow's: measured with torchvision 0.28, up to 2 grey levels in
0-2% of the values, 0.03 after CLIP normalization):

1. `select_best_resolution`: the pinpoint (grid resolution, (height, width)) that keeps the most
   of the image's pixels after an aspect-preserving fit, ties broken by the least padding
   (transformers' `image_processing_utils.select_best_resolution`).
2. The image is resized (Pillow, bicubic by default) to `fit_size` (transformers'
   `get_patch_output_size`: the limiting side exactly, the other `ceil`ed) and padded with
   BLACK pixels (0, not the mean colour) to the pinpoint, centered, the odd pixel right/below.
3. The padded canvas is cut into tower-sized tiles in row-major order (`divide_to_patches`).
4. Tile 0, the base image, is the WHOLE image resized to (tile, tile), aspect ratio NOT kept:
   no shortest-edge resize and no center crop, although `LlavaNextImageProcessor` carries
   `size={'shortest_edge': 336}` and `crop_size` (the processor turns `shortest_edge` into a
   square resize for the base; the later per-tile resize and crop are identities on square
   tiles of that size).
5. Each tile: `x * (1/255)` computed in float64 and cast to float32, then
   `(x - mean) / std` in float32 (transformers' `rescale`, `normalize`): bit-equal pixels.

OneVision with several images in one sample (`batch_num_images > 1`) does not tile: each
image is padded to a square with the mean colour (`int(m * 255)` per channel) and resized to
one tile (`square_tile`); the model then appends one `image_newline` to its features.

Layout: `tiles(...)` returns `float32[T, S, S, 3]` (NHWC), T = 1 + grid rows * grid cols,
base first; `pad_tiles` pads it to the static `float32[max_tiles + 1, S, S, 3]` with zero tiles
and returns the true count. The processors' `image_sizes` entry is `(height, width)` of the
original image, the same `image_size` this module and `lvm.models.anyres` take.
"""

import math
from typing import Sequence

import numpy as np
from PIL import Image

# transformers' default resample for both processors (PILImageResampling.BICUBIC).
BICUBIC = Image.Resampling.BICUBIC

# The released LLaVA-NeXT (llava-v1.6) grids, (height, width) in pixels, 336 px CLIP tiles.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def onevision_pinpoints(tile_size: int = 384, max_grid: int = 6) -> tuple[tuple[int, int], ...]:
  """OneVision's grids 1x1 .. max_grid x max_grid of `tile_size` tiles, in its config's order."""
  return tuple((tile_size * i, tile_size * j)
               for i in range(1, max_grid + 1) for j in range(1, max_grid + 1))


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> None:
  """Raises ValueError unless every pinpoint is a positive multiple of `tile_size`."""
  if not pinpoints:
    raise ValueError('image_grid_pinpoints is empty')
  for p in pinpoints:
    if len(p) != 2 or min(p) <= 0 or p[0] % tile_size or p[1] % tile_size:
      raise ValueError(f'image_grid_pinpoints entry {list(p)} is not a (height, width) pair of '
                       f'positive multiples of the tower size {tile_size}')


def select_best_resolution(image_size: Sequence[int],
                           pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The pinpoint (height, width) an image of `image_size` (height, width) is tiled at.

  Most pixels kept after an aspect-preserving fit (`int` truncation of the fitted sides, capped
  at the original pixel count), then least wasted canvas; the first such pinpoint wins ties.
  """
  h, w = int(image_size[0]), int(image_size[1])
  if h < 1 or w < 1:
    raise ValueError(f'image size must be positive, got {(h, w)}')
  best, best_effective, best_waste = None, 0, float('inf')
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    waste = ph * pw - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (int(ph), int(pw)), effective, waste
  if best is None:
    raise ValueError(f'no grid in image_grid_pinpoints fits an image of size {(h, w)}')
  return best


def fit_size(image_size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
  """(height, width) of the image resized to fit `target` with its aspect ratio kept.

  transformers' `get_patch_output_size`: the side with the smaller scale is set to the target
  side exactly; the other is `ceil(side * scale)`, capped at its target side.
  """
  h, w = image_size
  th, tw = target
  scale_w, scale_h = tw / w, th / h
  if scale_w < scale_h:
    return min(math.ceil(h * scale_w), th), tw
  return th, min(math.ceil(w * scale_h), tw)


def grid_shape(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]],
               tile_size: int) -> tuple[int, int]:
  """(rows, cols) of grid tiles for an image (`get_anyres_image_grid_shape`)."""
  ph, pw = select_best_resolution(image_size, pinpoints)
  return ph // tile_size, pw // tile_size


def max_grid_tiles(pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
  """The most grid tiles any image can get (the static `max_tiles`; the base tile not counted)."""
  check_pinpoints(pinpoints, tile_size)
  return max((ph // tile_size) * (pw // tile_size) for ph, pw in pinpoints)


def normalize(a: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8[..., 3] -> float32, bit-equal to transformers' `rescale` then `normalize`.

  Those compute `x * (1/255)` in float64, cast to float32, then `(x - mean) / std` in float32;
  here the same arithmetic on the 256 possible values of each channel, then a table lookup
  (about 10x faster than converting every pixel through float64).
  """
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
  table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [256, 3]
  return table[a, np.arange(3)]


def _as_pil(im) -> Image.Image:
  if isinstance(im, np.ndarray):
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f'expected a uint8[H, W, 3] array, got {im.dtype}{list(im.shape)}')
    return Image.fromarray(im, 'RGB')
  if im.mode != 'RGB':
    raise ValueError(f'expected an RGB image, got mode {im.mode!r} (see lvm.data.images.to_rgb)')
  return im


def tiles(im, pinpoints: Sequence[Sequence[int]], tile_size: int, mean: Sequence[float],
          std: Sequence[float], resample=BICUBIC) -> np.ndarray:
  """An RGB image -> normalized float32[1 + rows * cols, tile, tile, 3], base tile first.

  Args:
    im: a PIL RGB image or a uint8[H, W, 3] array.
    pinpoints: the checkpoint's `image_grid_pinpoints`, (height, width) each, multiples of
      `tile_size`.
    tile_size: the tower's image size (336 for llava-v1.6's CLIP, 384 for OneVision's SigLIP).
    mean, std: the processor's `image_mean` / `image_std` in [0, 1] units.
    resample: the Pillow filter (the processor's `resample`; bicubic in released configs).
  """
  check_pinpoints(pinpoints, tile_size)
  im = _as_pil(im)
  w, h = im.size
  best = select_best_resolution((h, w), pinpoints)
  nh, nw = fit_size((h, w), best)
  canvas = np.zeros((best[0], best[1], 3), np.uint8)
  top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
  # Pillow returns an unfiltered copy when the size is unchanged, as transformers relies on.
  canvas[top:top + nh, left:left + nw] = np.asarray(im.resize((nw, nh), resample))
  rows, cols = best[0] // tile_size, best[1] // tile_size
  grid = canvas.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
  base = np.asarray(im.resize((tile_size, tile_size), resample))
  out = np.concatenate([base[None], grid.reshape(rows * cols, tile_size, tile_size, 3)])
  return normalize(out, mean, std)


def square_tile(im, tile_size: int, mean: Sequence[float], std: Sequence[float],
                resample=BICUBIC) -> np.ndarray:
  """OneVision's multi-image path: square padding with the mean colour, resize; float32[1, S, S, 3].

  The padding colour is `int(m * 255)` of the processor's `image_mean`, the image centered with
  the odd pixel right/below (`LlavaOnevisionImageProcessor.pad_to_square`).
  """
  a = np.asarray(_as_pil(im))
  h, w = a.shape[:2]
  if h != w:
    side = max(h, w)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = np.asarray([int(m * 255) for m in mean], np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = a
    a = square
  out = np.asarray(Image.fromarray(a, 'RGB').resize((tile_size, tile_size), resample))
  return normalize(out[None], mean, std)


def pad_tiles(t: np.ndarray, max_tiles: int) -> tuple[np.ndarray, int]:
  """float32[T, S, S, 3] -> (float32[max_tiles + 1, S, S, 3] zero-padded, T).

  `max_tiles` counts grid tiles (`max_grid_tiles`); the extra slot is the base tile.
  """
  n = t.shape[0]
  if n > max_tiles + 1:
    raise ValueError(f'{n - 1} grid tiles exceed the configured maximum of {max_tiles}')
  out = np.zeros((max_tiles + 1,) + t.shape[1:], t.dtype)
  out[:n] = t
  return out, n
