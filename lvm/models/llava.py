"""LLaVA: vision tower -> projector -> visual tokens spliced into the text -> decoder.

Letters: B batch, N images per sample, T tiles per image (anyres), P visual tokens per image
(per tile for anyres, after the projector), L sequence length, D decoder width, V vocabulary.
A fixed-size model takes `images float[B, N, H, W, 3]`; an anyres one (LLaVA-NeXT,
OneVision; `anyres` set) `images float[B, N, T, H, W, 3]` with `image_sizes int[B, N, 2]`
(see `lvm.models.anyres_model`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm import lora as lora_lib
from lvm.models import anyres_model
from lvm.models import anyres_tables


def check_image_tokens(input_ids, image_token_id: int, tokens_per_image: int, num_images: int):
  """Raises ValueError if a row's image-token count cannot match its images.

  Each row must hold a whole number of images' tokens, and no more than its N image
  slots provide (fewer is fine: trailing slots are padding). Only concrete ids can be
  checked; under jit the data pipeline guarantees this (and tests it).
  """
  try:
    ids = np.asarray(input_ids)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced (under jit): nothing concrete to check
  counts = (ids == image_token_id).sum(axis=-1)
  for row, count in enumerate(counts.reshape(-1)):
    if count % tokens_per_image or count > num_images * tokens_per_image:
      raise ValueError(
          f'Row {row} has {count} image tokens (id {image_token_id}), but each image gives '
          f'{tokens_per_image} visual tokens and the row has {num_images} image slot(s): '
          f'expected a multiple of {tokens_per_image} up to {num_images * tokens_per_image}.')


def merge_visual_tokens(text_embeds, visual_tokens, is_image):
  """Writes each row's visual tokens, in order, into its image-token positions.

  Static shapes only: the k-th image position of a row takes visual token k, found
  with a cumulative sum and a gather instead of boolean indexing.

  Args:
    text_embeds: float[B, L, D].
    visual_tokens: float[B, N*P, D] (the row's images, flattened in order).
    is_image: bool[B, L].

  Returns:
    float[B, L, D].
  """
  index = jnp.cumsum(is_image, axis=1) - 1
  index = jnp.clip(index, 0, visual_tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(visual_tokens, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class LLaVA(nn.Module):
  """The composite model; `__call__(images, input_ids) -> logits`.

  The parts are any registered kinds (`lvm.models.build`): a vision tower maps images
  float[B, H, W, 3] to features float[B, P, Dv] and has `num_tokens` (P); a projector maps
  them to float[B, P', D] and has `tokens_out(P) -> P'`; a decoder has `embed(ids)` and
  `__call__(x, positions, attention_mask, cache, cache_index, logit_positions)`.
  """
  vision: nn.Module
  projector: nn.Module
  decoder: nn.Module
  image_token_id: int
  anyres: anyres_tables.Layout | None = None  # None: a fixed-size model
  # LoRA adapters on the Dense layers `lora.targets` selects (lvm.lora); None: none. The
  # parts run under `lora_lib.adapters`, which adds each adapter beside its base weight.
  lora: lora_lib.Spec | None = None

  def setup(self):
    if self.anyres is not None:
      self.image_newline = anyres_model.newline_param(self, self.decoder.width,
                                                      self.decoder.param_dtype)

  @property
  def tokens_per_image(self) -> int:
    """Visual tokens per image (fixed-size) or per tile (anyres)."""
    return self.projector.tokens_out(self.vision.num_tokens)

  def embed_image(self, images):
    """images float[B, N, H, W, 3] -> visual tokens float[B, N*P, D]."""
    b, n = images.shape[:2]
    with lora_lib.adapters(self.lora):
      feats = self.vision(images.reshape(b * n, *images.shape[2:]))
    return self.project_features(feats.reshape(b, n, *feats.shape[1:]))

  def project_features(self, features):
    """The tower's selected features float[B, N, Pv, Dv] -> visual tokens float[B, N*P, D].

    What `embed_image` does after the tower; a run with cached features
    (`lvm.data.feature_cache`) starts here.
    """
    b, n = features.shape[:2]
    with lora_lib.adapters(self.lora):
      tokens = self.projector(features.reshape(b * n, *features.shape[2:]))
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

  def embed_tiles(self, images, image_sizes=None, tile_budget=None, tile_groups=1):
    """Anyres tiles float[B, N, T, H, W, 3] -> projected features float[B, N, T, P, D].

    Every tile goes through the tower, zero ones included, unless `tile_budget` R (static)
    is given: then only the real tiles do, in R slots (see `anyres_model`).
    """
    b, n, t = images.shape[:3]
    def embed(x):
      with lora_lib.adapters(self.lora):
        return self.projector(self.vision(x))

    if tile_budget is not None and tile_budget < b * n * t:
      return anyres_model.real_tile_features(embed, images, image_sizes, self.anyres,
                                             tile_budget, tile_groups)
    tokens = embed(images.reshape(b * n * t, *images.shape[3:]))
    return tokens.reshape(b, n, t, *tokens.shape[1:])

  def embed_anyres(self, images, input_ids, image_sizes, tile_budget=None, tile_groups=1):
    """The visual-token stream float[B, L, D] of an anyres batch, in image-token order."""
    if image_sizes is None:
      raise ValueError('an anyres model (model.anyres.pinpoints set) needs image_sizes '
                       'int[B, N, 2] with its images float[B, N, T, H, W, 3]')
    if images.ndim != 6 or tuple(image_sizes.shape) != (*images.shape[:2], 2):
      raise ValueError(f'anyres images must be [B, N, T, H, W, 3] with image_sizes [B, N, 2]; '
                       f'got {images.shape} and {tuple(image_sizes.shape)}')
    if self.tokens_per_image != self.anyres.n ** 2:
      raise ValueError(f'anyres packs {self.anyres.n}x{self.anyres.n} features per tile, but '
                       f'the tower and projector give {self.tokens_per_image} (use the '
                       "'default' feature selection that drops CLIP's class token)")
    anyres_model.check_image_tokens(input_ids, image_sizes, self.image_token_id, self.anyres)
    feats = self.embed_tiles(images, image_sizes, tile_budget, tile_groups)
    return anyres_model.pack_images(feats, image_sizes, self.image_newline, self.anyres,
                                    input_ids.shape[1])

  def embed_text(self, input_ids):
    """int[B, L] -> float[B, L, D]; image-token ids embed as token 0 (overwritten later)."""
    return self.decoder.embed(jnp.where(input_ids == self.image_token_id, 0, input_ids))

  def embed(self, images, input_ids, image_sizes=None, tile_budget=None, tile_groups=1,
            image_features=None):
    """The decoder's input embeddings float[B, L, D] with the visual tokens in place."""
    is_image = input_ids == self.image_token_id
    if image_features is not None and (images is not None or self.anyres is not None):
      raise ValueError('image_features float[B, N, Pv, Dv] replace images of a fixed-size '
                       'model: pass images=None (and no anyres layout)')
    x = self.embed_text(input_ids)
    if self.anyres is not None:
      if images is not None and images.shape[1]:
        tokens = self.embed_anyres(images, input_ids, image_sizes, tile_budget, tile_groups)
        x = merge_visual_tokens(x, tokens, is_image)
      elif self.is_initializing():
        self.image_newline  # pylint: disable=pointless-statement  (created for text-only init)
      return x
    # Cached features (lvm.data.feature_cache) are the tower's output: only the projector runs.
    pixels_or_features = images if image_features is None else image_features
    num_images = 0 if pixels_or_features is None else pixels_or_features.shape[1]
    check_image_tokens(input_ids, self.image_token_id, self.tokens_per_image, num_images)
    if num_images:
      tokens = (self.embed_image(images) if image_features is None
                else self.project_features(image_features))
      x = merge_visual_tokens(x, tokens, is_image)
    return x

  def forward(self, images, input_ids, attention_mask=None, positions=None, cache=None,
              cache_index=None, logit_positions=None, image_sizes=None, segment_ids=None,
              tile_budget=None, tile_groups=1, image_features=None):
    """Like __call__, with a KV cache: returns (logits float[B, L, V], new cache)."""
    x = self.embed(images, input_ids, image_sizes, tile_budget, tile_groups, image_features)
    # Only packed batches pass segments, so a registered decoder without packing still fits.
    packed = {} if segment_ids is None else {'segment_ids': segment_ids}
    with lora_lib.adapters(self.lora):
      return self.decoder(x, positions=positions, attention_mask=attention_mask, cache=cache,
                          cache_index=cache_index, logit_positions=logit_positions, **packed)

  def decode(self, input_ids, cache, cache_index, attention_mask=None, positions=None):
    """Text-only continuation with a cache (images were written at prefill)."""
    x = self.embed_text(input_ids)
    with lora_lib.adapters(self.lora):
      return self.decoder(x, positions=positions, attention_mask=attention_mask, cache=cache,
                          cache_index=cache_index)

  def __call__(self, images, input_ids, attention_mask=None, positions=None,
               logit_positions=None, image_sizes=None, segment_ids=None, tile_budget=None,
               tile_groups=1, image_features=None):
    """Logits for a batch.

    Args:
      images: float[B, N, H, W, 3] (anyres: float[B, N, T, H, W, 3] tiles), normalized, or
        None for text only. Rows with fewer images than N carry padding images whose tokens
        never appear (anyres: their image_sizes (0, 0)).
      input_ids: int[B, L], with `tokens_per_image` image-token ids per real image (anyres:
        `lvm.models.num_image_tokens(config, image_size=...)` per image, one run each).
      attention_mask: optional bool[B, L] (False: padding key).
      positions: optional int[B, L] RoPE positions.
      logit_positions: optional int[B, P]: logits only at these positions.
      image_sizes: int[B, N, 2] original (height, width) of each image; anyres only.
      segment_ids: optional int[B, L] of a packed batch (`lvm.data.packing`): several
        samples per row, 0 on padding; attention stays within a segment. The row's images
        are its samples' images in order; pass `positions` restarting per segment.
      tile_budget, tile_groups: static ints, anyres only: run the tower on `tile_budget` slots
        holding the real tiles (`tile_groups` groups of rows, each with its own share), not
        on all B x N x T (see `lvm.models.anyres_model`); None: all tiles.
      image_features: float[B, N, Pv, Dv], the tower's selected features of the images
        (`lvm.data.feature_cache`), in place of `images` (then None): the tower is skipped.

    Returns:
      logits float[B, L, V] (or [B, P, V]) in the compute dtype.
    """
    return self.forward(images, input_ids, attention_mask, positions,
                        logit_positions=logit_positions, image_sizes=image_sizes,
                        segment_ids=segment_ids, tile_budget=tile_budget,
                        tile_groups=tile_groups, image_features=image_features)[0]
