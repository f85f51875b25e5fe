"""Image decoding and LLaVA-1.5 preprocessing (pad to square / resize, crop, normalize).

`preprocess` matches transformers' `CLIPImageProcessor` (shortest side to `size` bicubic,
center crop, rescale 1/255, normalize) to 1e-5; `aspect='pad'` first expands the image to a
square filled with the mean colour, as LLaVA-1.5's `expand2square`.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image

# config.data.image_aspect: expand to a square with the mean colour first, or only resize + crop.
ASPECTS = ('pad', 'resize')
# Decompression-bomb guard: images above this many pixels are rejected before decoding.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
  """An image that cannot be used; `reason` is the short key it is counted under."""

  def __init__(self, reason: str, message: str = ''):
    super().__init__(f'{reason}: {message}' if message else reason)
    self.reason = reason


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, list[str]]:
  """Decodes encoded bytes into an RGB PIL image.

  Returns:
    (image, notes): notes name conversions applied (e.g. 'converted_rgba', 'converted_cmyk').

  Raises:
    ImageError: empty_image, corrupt_image, truncated_image, image_too_large.
  """
  if not data:
    raise ImageError('empty_image')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ImageError('image_too_large', str(e)) from e
  except Image.DecompressionBombWarning as e:
    raise ImageError('image_too_large', str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError('corrupt_image', f'{type(e).__name__}: {e}') from e
  w, h = im.size
  if w * h > max_pixels:  # Checked on the header, before the pixels are decoded.
    raise ImageError('image_too_large', f'{w}x{h} > {max_pixels} pixels')
  if w < 1 or h < 1:
    raise ImageError('corrupt_image', f'size {w}x{h}')
  try:
    im.load()
  except OSError as e:
    reason = 'truncated_image' if 'truncated' in str(e) else 'corrupt_image'
    raise ImageError(reason, str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError('corrupt_image', f'{type(e).__name__}: {e}') from e
  return to_rgb(im)


def to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
  """Converts any PIL mode to RGB; transparency is composited over white."""
  if im.mode == 'RGB':
    return im, []
  notes = [f'converted_{im.mode.lower().replace(";", "")}']
  if im.mode == 'P':
    im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
  if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    im = im.convert('RGBA')
    background = Image.new('RGBA', im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  elif im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
    # High bit depth grey: rescale the range to 8 bits.
    a = np.asarray(im, np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    im = Image.fromarray(a.round().astype(np.uint8), 'L')
  return im.convert('RGB'), notes


def expand2square(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
  """Pads to a square, image centered (LLaVA-1.5 `expand2square`)."""
  w, h = im.size
  if w == h:
    return im
  side = max(w, h)
  out = Image.new(im.mode, (side, side), background)
  out.paste(im, ((side - w) // 2, (side - h) // 2))
  return out


def mean_colour(mean) -> tuple[int, int, int]:
  return tuple(int(x * 255) for x in mean)


def resize_shortest(im: Image.Image, size: int) -> Image.Image:
  """Shortest side to `size`, bicubic, the long side as transformers computes it."""
  w, h = im.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return im
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  return im.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
  """Center crop of an [H, W, C] array (pads with zeros if smaller, like transformers)."""
  h, w = a.shape[:2]
  if h < size or w < size:
    ph, pw = max(size - h, 0), max(size - w, 0)
    a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = a.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return a[top:top + size, left:left + size]


def preprocess(im: Image.Image, size: int, aspect: str, mean, std) -> np.ndarray:
  """RGB PIL image -> normalized float32[size, size, 3].

  Args:
    im: an RGB image.
    size: output side (the tower's image size).
    aspect: 'pad' (expand to square with the mean colour first) or 'resize' (shortest side
      resize and center crop only).
    mean, std: per-channel normalization in [0, 1] units.
  """
  if aspect == 'pad':
    im = expand2square(im, mean_colour(mean))
  elif aspect != 'resize':
    raise ValueError(f'config.data.image_aspect must be one of {ASPECTS}, got {aspect!r}')
  a = center_crop(np.asarray(resize_shortest(im, size)), size)
  # (x / 255 - mean) / std as one multiply-add from uint8, with no float64 temporaries.
  scale = np.float32(1 / 255) / np.asarray(std, np.float32)
  offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  out = np.multiply(a, scale, dtype=np.float32)
  out -= offset
  return out


def load(data: bytes, size: int, aspect: str, mean, std) -> np.ndarray:
  """Encoded bytes -> normalized float32[size, size, 3] (raises ImageError)."""
  im, _ = decode(data)
  return preprocess(im, size, aspect, mean, std)


def open_image(image) -> Image.Image:
  """A file path, encoded bytes, a PIL image or a uint8[H, W, 3] array -> an RGB PIL image.

  Raises:
    ImageError: missing_image, not_a_file, empty/corrupt/truncated image, image_too_large;
      for a path, the message names the file.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    path = epath.Path(image)
    if not path.exists():
      raise ImageError('missing_image', f'{image}: no such file')
    if path.is_dir():
      raise ImageError('not_a_file', f'{image}: is a folder, not an image file')
    try:
      return decode(path.read_bytes())[0]
    except ImageError as e:
      raise ImageError(e.reason, f'{image}: {str(e).removeprefix(e.reason + ": ")} '
                       '(not a readable image file)') from e
  if isinstance(image, bytes):
    return decode(image)[0]
  if isinstance(image, np.ndarray):
    return Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  return to_rgb(image)[0]


def load_image(image, config) -> np.ndarray:
  """The one image loader of inference: a file path, encoded bytes or a PIL image ->
  float32[H, W, 3] preprocessed as the run's data pipeline does (`config.model.vision.
  image_size`, `config.data.image_aspect`, `image_mean`, `image_std`).

  Raises:
    ImageError: as `open_image`.
  """
  size, aspect = int(config.model.vision.image_size), config.data.image_aspect
  return preprocess(open_image(image), size, aspect, config.data.image_mean,
                    config.data.image_std)
