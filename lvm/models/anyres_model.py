"""The anyres embedding step of `LLaVA` (LLaVA-NeXT / OneVision) and its config.

`config.model.anyres.pinpoints` non-empty makes an anyres model (see `lvm.config`):

  model.apply({'params': p}, images, input_ids, image_sizes=image_sizes) -> logits
    images       float[B, N, T, H, W, 3]: per image the base tile then its grid tiles
                 (`lvm.data.anyres.tiles`, padded with zero tiles to T = max_tiles + 1)
    image_sizes  int[B, N, 2]: original (height, width); (0, 0) for an absent image slot
    input_ids    int[B, L]: per present image, in slot order, exactly
                 `lvm.models.num_image_tokens(model_config, image_size=(h, w))` image tokens

Inside the jitted apply, the pack tables come from the traced `image_sizes`
(`lvm.models.anyres_tables`), each image's tile features are packed (`anyres.pack`: base
tile, unpadded grid map, `image_newline` after each row, OneVision's bilinear downscale), and
a row's images are concatenated without gaps (`anyres.stream_index`) into its image-token
positions.

Compute: by default all B * N * T tiles go through the tower and projector, the zero tiles of
small grids and of absent images included, whose features are never read (the tables point
only at the image's own tiles, so they change nothing). With LLaVA-NeXT's pinpoints (T = 5),
a 1x2 grid wastes 2 of 5 tile passes; with OneVision's 6x6 (T = 37), a 2x2 image wastes 32.
`tile_budget=R` (static) skips them: the real tiles (`anyres_tables.num_tiles` of each image,
from the traced sizes) are gathered into R slots, the tower and projector run on R tiles, and
their features are scattered back (`real_tile_features`); zero features stand in for the rest.
`tile_groups=G` splits the batch into G equal groups of rows with R / G slots each, so that
with G = the number of batch shards no tile crosses a device. The caller picks R >= the real
tiles of every group (`lvm.anyres_inputs` does); eagerly a smaller R raises, under jit the
tiles past it would get the features of another tile.

Token counts: called eagerly (concrete ids and sizes), `check_image_tokens` raises naming the
row and image whose count does not match; under jit nothing can be checked, and a mismatch
silently misplaces visual tokens (the data pipeline guarantees the counts).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm import registry
from lvm.data import anyres as data_anyres
from lvm.models import anyres
from lvm.models import anyres_tables


def layout(model_config) -> anyres_tables.Layout | None:
  """The anyres layout of `config.model`, or None for a fixed-size model (no pinpoints)."""
  a = model_config.anyres
  if not a.pinpoints:
    return None
  return anyres_tables.Layout(
      pinpoints=tuple((int(h), int(w)) for h, w in a.pinpoints),
      tile_size=model_config.vision.image_size, patch_size=model_config.vision.patch_size,
      max_num_patches=anyres.parse_vision_aspect_ratio(a.vision_aspect_ratio))


def num_tiles(model_config) -> int:
  """T: tiles per image slot (the base tile + `max_tiles`, or the pinpoints' maximum)."""
  lay = layout(model_config)
  return 1 + (model_config.anyres.max_tiles or lay.max_tiles)


def check_anyres(config, problems: registry.Problems):
  """`model.anyres`: pinpoints dividing the tower size, a known aspect rule, enough tiles."""
  m = config.model
  a = m.get('anyres')
  if a is None or not a.get('pinpoints'):
    return
  tile = m.vision.get('image_size')
  try:
    anyres.parse_vision_aspect_ratio(a.get('vision_aspect_ratio'))
  except (ValueError, AttributeError) as e:
    problems.add('model.anyres.vision_aspect_ratio', str(e), "use 'anyres' or 'anyres_max_9'")
  if not isinstance(tile, int) or tile <= 0:
    return
  try:
    data_anyres.check_pinpoints(a.pinpoints, tile)
  except (ValueError, TypeError) as e:
    problems.add('model.anyres.pinpoints', str(e),
                 f'use (height, width) pairs of multiples of model.vision.image_size ({tile})')
    return
  most = data_anyres.max_grid_tiles(a.pinpoints, tile)
  if a.get('max_tiles') and a.max_tiles < most:
    problems.add('model.anyres.max_tiles', f'{a.max_tiles} is fewer than the {most} tiles '
                 'the largest pinpoint grid needs', f'set it to 0 (derived) or >= {most}')


def check_image_tokens(input_ids, image_sizes, image_token_id: int, lay: anyres_tables.Layout):
  """Raises ValueError naming the row (and image) whose image-token count is wrong.

  Each present image's tokens must be one contiguous run of
  `lay.num_image_tokens(size)` ids, in slot order. Traced inputs (under jit) are not checked.
  """
  try:
    ids, sizes = np.asarray(input_ids), np.asarray(image_sizes)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  for row in range(ids.shape[0]):
    present = [tuple(int(v) for v in s) for s in sizes[row] if min(s) > 0]
    if any(max(s) > anyres_tables.MAX_SIDE for s in present):
      raise ValueError(f'Row {row}: an image side exceeds {anyres_tables.MAX_SIDE} px '
                       f'(sizes {present}); resize it first')
    want = [lay.num_image_tokens(s) for s in present]
    is_image = np.concatenate([[0], (ids[row] == image_token_id).astype(np.int8), [0]])
    starts = np.nonzero(np.diff(is_image) == 1)[0]
    ends = np.nonzero(np.diff(is_image) == -1)[0]
    runs = (ends - starts).tolist()
    if sum(runs) != sum(want) or (len(runs) == len(want) and runs != want):
      bad = next((i for i, (r, w) in enumerate(zip(runs, want)) if r != w), None)
      where = (f'image {bad} (size {present[bad]}) needs {want[bad]} image tokens but its run '
               f'has {runs[bad]}' if bad is not None and len(runs) == len(want) else
               f'{sum(runs)} image tokens (id {image_token_id}) for {len(present)} image(s) of '
               f'sizes {present}, which need {want} = {sum(want)}')
      raise ValueError(f'Row {row}: {where} (lvm.models.num_image_tokens(config, '
                       'image_size=...) gives the count).')


def pack_images(features, image_sizes, image_newline, lay: anyres_tables.Layout, size: int):
  """Tile features -> each row's visual-token stream, in image-token order.

  Args:
    features: float[B, N, T, P, D] projected tower features (P = n * n per tile).
    image_sizes: int[B, N, 2] (traced is fine).
    image_newline: float[D].
    lay: the static layout.
    size: S, the stream length (the sequence length).

  Returns:
    float[B, S, D]: the k-th visual token of row b at [b, k] (past the row's total: any
    valid token, which `merge_visual_tokens` never reads).
  """
  b, n = features.shape[:2]
  index, weight, newline, length = anyres_tables.tables(lay, image_sizes)
  pack = jax.vmap(jax.vmap(anyres.pack, (0, 0, 0, 0, None)), (0, 0, 0, 0, None))
  packed = pack(features, index, weight, newline, image_newline)  # [B, N, Lm, D]
  flat = packed.reshape(b, n * lay.max_len, packed.shape[-1])
  stream = anyres.stream_index(length, lay.max_len, size)  # [B, S]
  return jnp.take_along_axis(flat, stream[..., None], axis=1)


def newline_param(module: nn.Module, width: int, param_dtype) -> jnp.ndarray:
  """The `image_newline` parameter float[D] (transformers: randn / sqrt(D))."""
  init = nn.initializers.normal(stddev=width ** -0.5)
  return module.param('image_newline', nn.with_logical_partitioning(init, ('embed',)),
                      (width,), param_dtype)


def real_tile_features(embed, images, image_sizes, lay: anyres_tables.Layout, budget: int,
                       groups: int = 1):
  """`embed` (tower + projector) run on the real tiles only, zero features for the others.

  Args:
    embed: float[R, H, W, 3] -> float[R, P, D].
    images: float[B, N, T, H, W, 3] tiles (T may be fewer than the layout's maximum).
    image_sizes: int[B, N, 2].
    lay: the static layout.
    budget: R, static: tile slots the tower runs on (a multiple of `groups`).
    groups: G, static: equal groups of rows that each gather their own R / G real tiles.

  Returns:
    float[B, N, T, P, D].
  """
  b, n, t = images.shape[:3]
  if budget % groups or b % groups:
    raise ValueError(f'tile_budget {budget} and the batch size {b} must be multiples of '
                     f'tile_groups {groups}')
  slots = budget // groups
  try:  # concrete sizes (eager): counted on the host, and the budget checked
    sizes = np.asarray(image_sizes)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    used = anyres_tables.num_tiles(lay, image_sizes)  # traced: the caller keeps the budget
  else:
    used = np.asarray([0 if min(hw) <= 0 else 1 + int(np.prod(data_anyres.grid_shape(
        hw, lay.pinpoints, lay.tile_size))) for hw in sizes.reshape(-1, 2)]).reshape(b, n)
    most = int(used.reshape(groups, -1).sum(-1).max())
    if most > slots:
      raise ValueError(f'{most} real tiles in a group of rows exceed tile_budget / tile_groups '
                       f'= {slots}; raise tile_budget')
  real = (jnp.arange(t) < jnp.asarray(used)[..., None]).reshape(groups, -1)  # [G, B/G*N*T]
  flat = images.reshape(groups, -1, *images.shape[3:])
  picked = jax.vmap(lambda m: jnp.nonzero(m, size=slots, fill_value=0)[0])(real)  # [G, R/G]
  feats = embed(jax.vmap(lambda x, i: x[i])(flat, picked).reshape(budget, *images.shape[3:]))
  feats = feats.reshape(groups, slots, *feats.shape[1:])
  slot = jnp.clip(jnp.cumsum(real, axis=1) - 1, 0, slots - 1)  # each tile's compact slot
  full = jax.vmap(lambda f, i: f[i])(feats, slot)  # [G, M, P, D]
  full = jnp.where(real[..., None, None], full, jnp.zeros((), full.dtype))
  return full.reshape(b, n, t, *feats.shape[2:])
