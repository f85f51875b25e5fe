"""The anyres pack tables of `lvm.models.anyres`, computed inside jit from traced image sizes.

`anyres.pack_table` makes an image's gather tables on the host from Python floats (float64),
as transformers does. Here the same tables come from int32 arithmetic on `int[..., 2]` image
sizes, so `model.apply(..., image_sizes=...)` jits once per static layout and equals the host
tables bit for bit (tested on thousands of sizes, including the float64 edge cases):

- `select_best_resolution`'s `int(side * (pin / den))`: `floor(side * pin / den)`, except
  when that quotient is an integer k and the float64 product rounds just below it (e.g.
  `int(79 * (336 / 79)) == 335`, a 79 px wide image); `_float_floor_mul` decides that case
  exactly from the rounding error of `pin / den` (its remainder mod `den`, computed by
  modular doubling) and the spacing of doubles below k.
- `unpad_box`'s `int(round(side * (cw / w), 7))`: `floor(side * cw / w)` (the `round(.., 7)`
  absorbs every float error while sides are below 2e7).
- OneVision's `downscaled_shape` (a square root and a float floor division): a host-made table
  over the bounded unpadded map sizes (`rows <= max grid rows * n`, same for columns).
- The bilinear taps' float32 source coordinate `fl32(scale * (i + 0.5) - 0.5)`, rounded once
  as torch's fused multiply-add: the float32 scale split in two 12-bit halves whose products
  with `2i + 1` are exact, then one float32 addition.

Limits: image sides up to `MAX_SIDE` (int32 products stay exact); pinpoints up to 8192 px.
An image whose height or width is <= 0 is absent: all-zero tables and length 0 (padding image
slots, rows without images).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvm.data.anyres import check_pinpoints
from lvm.models import anyres

MAX_SIDE = 32767
MAX_PINPOINT = 8192


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static anyres layout of a model (hashable; a jit compiles once per layout).

  Attributes:
    pinpoints: `image_grid_pinpoints`, (height, width) pairs, multiples of `tile_size`.
    tile_size: the tower's image size.
    patch_size: pixels per output feature (the tower's patch size).
    max_num_patches: N of OneVision's 'anyres_max_N'; None for LLaVA-NeXT.
  """
  pinpoints: tuple[tuple[int, int], ...]
  tile_size: int
  patch_size: int
  max_num_patches: int | None = None

  def __post_init__(self):
    check_pinpoints(self.pinpoints, self.tile_size)
    if max(max(p) for p in self.pinpoints) > MAX_PINPOINT:
      raise ValueError(f'image_grid_pinpoints above {MAX_PINPOINT} px are not supported')

  @property
  def n(self) -> int:
    return anyres.patches_per_side(self.tile_size, self.patch_size)

  @functools.cached_property
  def max_len(self) -> int:
    return anyres.max_image_tokens(self.pinpoints, self.tile_size, self.patch_size,
                                   self.max_num_patches)

  @property
  def taps(self) -> int:
    return 4 if self.max_num_patches is not None else 1

  @property
  def max_tiles(self) -> int:
    """T - 1: the most grid tiles an image gets (T counts the base tile too)."""
    return max((ph // self.tile_size) * (pw // self.tile_size) for ph, pw in self.pinpoints)

  def host_table(self, image_size: Sequence[int]) -> anyres.PackTable:
    """`anyres.pack_table` of one image for this layout (the reference of `tables`)."""
    return anyres.pack_table(image_size, self.pinpoints, self.tile_size, self.patch_size,
                             self.max_len, self.max_num_patches)

  def num_image_tokens(self, image_size: Sequence[int]) -> int:
    return anyres.num_image_tokens(image_size, self.pinpoints, self.tile_size, self.patch_size,
                                   self.max_num_patches)


def _floor_log2(x):
  """floor(log2 x) of int32 x >= 1."""
  return jnp.sum(x[..., None] >= (1 << jnp.arange(1, 31, dtype=jnp.int32)), -1, jnp.int32)


def _float_floor_mul(a, p, d):
  """`int(a * (p / d))` with Python (float64) semantics, for int32 arrays 1 <= a, d <= MAX_SIDE
  and 1 <= p <= MAX_PINPOINT.

  q = fl(p / d) = m * 2^-s with m the 53-bit rounded quotient. When k = a * p / d is an
  integer and q < p / d (remainder r = p 2^s - m d > 0), a * q = k - a r / (d 2^s), which
  rounds below k (so `int` gives k - 1) iff that shortfall exceeds half the spacing of doubles
  just below k (ties round to k's even mantissa).
  """
  a, p, d = jnp.broadcast_arrays(a, p, d)
  num = a * p
  k = num // d
  exact = num % d == 0
  # L = floor(log2(p / d)); s = 52 - L puts m in [2^52, 2^53).
  j = jnp.arange(1, 17, dtype=jnp.int32)
  lg = (jnp.sum((d[..., None] << j[:13]) <= p[..., None], -1, jnp.int32)
        - jnp.sum((p[..., None] << (j - 1)) < d[..., None], -1, jnp.int32))
  s = 52 - lg
  # t = p 2^s mod 2d by doubling (t < 2d <= 2^16): the remainder mod d and m's parity.
  t = jax.lax.fori_loop(0, 52 + 16, lambda i, t: jnp.where(i < s, (2 * t) % (2 * d), t),
                        p % (2 * d))
  r0, odd = t % d, t >= d
  rounds_up = (2 * r0 > d) | ((2 * r0 == d) & odd)
  short = exact & ~rounds_up & (r0 > 0)
  kk = jnp.maximum(k, 1)
  pow2 = (kk & (kk - 1)) == 0
  x1 = _floor_log2(kk) - lg - pow2.astype(jnp.int32) + 1  # X + 1 >= 0, 2^(X+1) < 4a
  lhs = 4 * a.astype(jnp.uint32) * r0.astype(jnp.uint32)
  rhs = d.astype(jnp.uint32) << jnp.clip(x1, 0, 31).astype(jnp.uint32)
  return k - (short & (lhs > rhs)).astype(jnp.int32)


def _select(layout: Layout, h, w):
  """Index into `layout.pinpoints` of `select_best_resolution((h, w), pinpoints)` (int[I])."""
  pins = np.asarray(layout.pinpoints, np.int32)
  ph, pw = jnp.asarray(pins[:, 0])[None], jnp.asarray(pins[:, 1])[None]  # [1, P]
  h, w = h[:, None], w[:, None]
  by_w = pw * h <= ph * w  # scale = min(pw / w, ph / h) comes from the width
  p, den = jnp.where(by_w, pw, ph), jnp.where(by_w, w, h)
  eff = jnp.minimum(_float_floor_mul(w, p, den) * _float_floor_mul(h, p, den), w * h)
  waste = ph * pw - eff
  # The first pinpoint of most effective pixels, then least waste (transformers' loop).
  best = eff == eff.max(-1, keepdims=True)
  waste = jnp.where(best, waste, np.iinfo(np.int32).max)
  best &= waste == waste.min(-1, keepdims=True)
  return jnp.argmax(best, -1)


def num_tiles(layout: Layout, image_sizes):
  """Tiles each image uses, the base tile and its grid's (`1 + rows * cols`); 0 for an absent
  image (height or width <= 0). Traceable.

  Args:
    layout: the static layout.
    image_sizes: int[..., 2] original (height, width).

  Returns:
    int32[...].
  """
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  lead = image_sizes.shape[:-1]
  h = jnp.clip(image_sizes[..., 0].reshape(-1), 1, MAX_SIDE)
  w = jnp.clip(image_sizes[..., 1].reshape(-1), 1, MAX_SIDE)
  present = (image_sizes[..., 0] > 0).reshape(-1) & (image_sizes[..., 1] > 0).reshape(-1)
  pins = np.asarray(layout.pinpoints, np.int32) // layout.tile_size
  grid = jnp.asarray(pins[:, 0] * pins[:, 1])[_select(layout, h, w)]
  return jnp.where(present, 1 + grid, 0).reshape(lead).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _downscale_table(layout: Layout) -> np.ndarray:
  """int32[R + 1, C + 1, 2]: `anyres.downscaled_shape` of every unpadded map size."""
  n = layout.n
  rmax = max(ph // layout.tile_size for ph, _ in layout.pinpoints) * n
  cmax = max(pw // layout.tile_size for _, pw in layout.pinpoints) * n
  out = np.zeros((rmax + 1, cmax + 1, 2), np.int32)
  for r in range(rmax + 1):  # 0: a panorama's map unpadded to no columns (or rows)
    for c in range(cmax + 1):
      out[r, c] = anyres.downscaled_shape(r, c, n, layout.max_num_patches)
  return out


def _bilinear(size_in, size_out, dst, scales):
  """torch's bilinear taps (`anyres._bilinear_taps`) at output index `dst`: (i0, i1, w0, w1)."""
  scale = scales[size_in, size_out]
  # fl32(scale * (2 dst + 1) - 1) / 2 with one rounding: scale's halves times 2 dst + 1 are
  # exact (12 + 9 bits), and so is hi * a - 1 (scale >= 1 when downscaling).
  bits = jax.lax.bitcast_convert_type(scale, jnp.int32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.int32(~0xFFF), jnp.float32)
  lo = scale - hi
  a = (2 * dst + 1).astype(jnp.float32)
  src = jnp.maximum(((hi * a - 1) + lo * a) * 0.5, 0)
  i0 = src.astype(jnp.int32)
  w1 = src - i0.astype(jnp.float32)
  return i0, jnp.minimum(i0 + 1, size_in - 1), 1 - w1, w1


def tables(layout: Layout, image_sizes):
  """Pack tables of images from their sizes; traceable (jit, vmap).

  Args:
    layout: the static layout.
    image_sizes: int[..., 2] original (height, width); height or width <= 0: absent image.

  Returns:
    (index int32[..., L, K], weight float32[..., L, K], newline float32[..., L],
    length int32[...]), equal to `layout.host_table` of each size (L = `layout.max_len`).
  """
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  lead = image_sizes.shape[:-1]
  h = jnp.clip(image_sizes[..., 0].reshape(-1), 1, MAX_SIDE)
  w = jnp.clip(image_sizes[..., 1].reshape(-1), 1, MAX_SIDE)
  present = (image_sizes[..., 0] > 0).reshape(-1) & (image_sizes[..., 1] > 0).reshape(-1)
  n, tile, big_l, taps = layout.n, layout.tile_size, layout.max_len, layout.taps
  base = n * n
  pins = np.asarray(layout.pinpoints, np.int32)
  choice = _select(layout, h, w)
  gr = jnp.asarray(pins[:, 0] // tile)[choice]
  gc = jnp.asarray(pins[:, 1] // tile)[choice]
  ch, cw = gr * n, gc * n
  wide = w * ch > cw * h
  pad_h = (ch - (h * cw) // w) // 2
  pad_w = (cw - (w * ch) // h) // 2
  top, left = jnp.where(wide, pad_h, 0), jnp.where(wide, 0, pad_w)
  rows, cols = ch - 2 * top, cw - 2 * left
  if layout.max_num_patches is None:
    out_r, out_c = rows, cols
  else:
    down = jnp.asarray(_downscale_table(layout))[rows, cols]
    out_r, out_c = down[:, 0], down[:, 1]
  length = jnp.where(present, base + out_r * out_c + out_r, 0)

  k = jnp.arange(big_l, dtype=jnp.int32)[None]  # [1, L] against per-image [I, 1]
  col1 = lambda v: v[:, None]
  j = k - base
  row, col = j // col1(out_c + 1), j % col1(out_c + 1)
  in_map = (j >= 0) & (row < col1(out_r))
  is_token = in_map & (col < col1(out_c))
  newline = (in_map & (col == col1(out_c)) & col1(present)).astype(jnp.float32)

  def flat(y, x):  # position in the unpadded map -> row of features.reshape(T * P, D)
    y, x = y + col1(top), x + col1(left)
    return (1 + (y // n) * col1(gc) + x // n) * base + (y % n) * n + x % n

  is_base = (k < base) & col1(present)
  is_token = is_token & col1(present)
  if taps == 1:
    srcs = [flat(row, col)]
    wts = [jnp.ones(is_token.shape, jnp.float32)]
  else:
    side = max(int(pins.max()) // tile * n, 1)
    grid = np.arange(side + 1, dtype=np.float32)
    with np.errstate(divide='ignore', invalid='ignore'):
      scales = jnp.asarray(grid[:, None] / grid[None, :])
    rr, cc = jnp.maximum(row, 0), jnp.maximum(col, 0)
    o_r, o_c = jnp.maximum(col1(out_r), 1), jnp.maximum(col1(out_c), 1)
    y0, y1, wy0, wy1 = _bilinear(col1(rows), o_r, jnp.minimum(rr, o_r - 1), scales)
    x0, x1, wx0, wx1 = _bilinear(col1(cols), o_c, jnp.minimum(cc, o_c - 1), scales)
    scaled = col1((out_r != rows) | (out_c != cols))
    ones = jnp.ones(is_token.shape, jnp.float32)
    zeros = jnp.zeros(is_token.shape, jnp.float32)
    srcs = [jnp.where(scaled, flat(y0, x0), flat(row, col)), jnp.where(scaled, flat(y0, x1), 0),
            jnp.where(scaled, flat(y1, x0), 0), jnp.where(scaled, flat(y1, x1), 0)]
    wts = [jnp.where(scaled, wy0 * wx0, ones), jnp.where(scaled, wy0 * wx1, zeros),
           jnp.where(scaled, wy1 * wx0, zeros), jnp.where(scaled, wy1 * wx1, zeros)]
  index, weight = [], []
  for t, (s, wt) in enumerate(zip(srcs, wts)):
    first = k if t == 0 else 0
    index.append(jnp.where(is_token, s, jnp.where(is_base, first, 0)))
    weight.append(jnp.where(is_token, wt, jnp.where(is_base & (t == 0), 1.0, 0.0)))
  index = jnp.stack(index, -1).astype(jnp.int32)
  weight = jnp.stack(weight, -1).astype(jnp.float32)
  return (index.reshape(*lead, big_l, taps), weight.reshape(*lead, big_l, taps),
          newline.reshape(*lead, big_l), length.reshape(lead).astype(jnp.int32))
