"""Position-embedding interpolation for a vision tower run at another resolution.

Matches transformers' `CLIPVisionEmbeddings.interpolate_pos_encoding` and
`SiglipVisionEmbeddings.interpolate_pos_encoding` (`interpolate_pos_encoding=True`):

- the table's patch part is a square `s x s` grid (`s = int(sqrt(num_positions))`), CLIP's
  class embedding (row 0) kept aside and put back in front unchanged; SigLIP has none;
- resized with `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` given an
  output SIZE `(image height // patch, image width // patch)`: the scale is `in / out` (not a
  user scale factor, as DINO's `scale_factor=(new + 0.1) / old` variant uses), source
  coordinate `(dst + 0.5) * scale - 0.5` without clamping, Keys' cubic with a = -0.75 (torch's
  and OpenCV's constant; `jax.image.resize`'s 'cubic' uses a = -0.5, so it is not used here),
  taps outside the grid clamped to the border row/column, no antialiasing;
- the table is returned untouched when the grid does not change (transformers' early return).

The resize is two static matrices (`bicubic_matrix`, numpy, from the grid sizes only) applied
as `W_h @ grid @ W_w^T`, so it jits once per (old grid, new grid) and costs nothing at run time
for a fixed tower resolution.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torch's bicubic constant (aten/src/ATen/native/UpSample.h, get_cubic_upsample_coefficients).
CUBIC_A = -0.75


def _cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel at |x| (torch's cubic_convolution1/2)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """float64[size_out, size_in]: torch's 1-D bicubic resize (align_corners=False) as a matrix."""
  # torch: the scale in float32, the source coordinate rounded once to float32 (a fused
  # multiply-add in its CPU kernel).
  scale = np.float64(np.float32(size_in) / np.float32(size_out))
  src = (scale * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
  base = np.floor(src)
  t = (src - base).astype(np.float64)
  out = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  for k in range(-1, 3):
    idx = np.clip(base.astype(np.int64) + k, 0, size_in - 1)
    np.add.at(out, (rows, idx), _cubic(t - k))
  return out


def interpolate(pos_embed: jnp.ndarray, new_grid: Sequence[int], has_cls: bool) -> jnp.ndarray:
  """Resizes a learned position-embedding table to a new patch grid.

  Args:
    pos_embed: float[N + has_cls, D], the class embedding first when `has_cls` (CLIP); the
      other N rows a row-major square grid.
    new_grid: (rows, cols) of patches at the new resolution (image side // patch size).
    has_cls: True for CLIP (row 0 kept as is), False for SigLIP.

  Returns:
    float[rows * cols + has_cls, D] in `pos_embed`'s dtype.
  """
  cls, grid = (pos_embed[:1], pos_embed[1:]) if has_cls else (None, pos_embed)
  n, d = grid.shape
  side = int(math.sqrt(n))
  if side * side != n:
    raise ValueError(f'position embedding grid of {n} positions is not square')
  h, w = int(new_grid[0]), int(new_grid[1])
  if (h, w) == (side, side):
    return pos_embed
  wh = jnp.asarray(bicubic_matrix(side, h), jnp.float32)
  ww = jnp.asarray(bicubic_matrix(side, w), jnp.float32)
  x = grid.reshape(side, side, d).astype(jnp.float32)
  out = jnp.einsum('ah,hwd,bw->abd', wh, x, ww, precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(h * w, d).astype(pos_embed.dtype)
  return jnp.concatenate([cls, out]) if has_cls else out
