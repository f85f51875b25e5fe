"""Parameter and FLOP counts for MFU, by DESIGN.md's rule.

A matmul with an [m, n] weight costs 2 m n FLOPs per token forward. Training adds a
backward pass of two matmuls per weight: one for the input gradient (needed wherever a
gradient must flow further down, even through frozen weights) and one for the weight
gradient (trainable weights only). So, per token, a part with N weights costs

  2 N                 forward
  + 2 N               input gradient, if anything before it is trainable
  + 2 N_trainable     weight gradient

which is 6 N for a trainable decoder, 4 N for a frozen decoder under a trainable projector
(stage 1) and 2 N for the frozen vision tower. Attention adds, per token and layer,
2 x 2 x heads x head_dim x keys forward (QK^T and AV), halved for the causal decoder,
and x3 in training when gradients flow through it:

  decoder, per trained token:  (6 | 4) N_dec + 6 x layers x heads x head_dim x L
  vision, per image:           T x (2 N_vis + 4 x layers_v x width_v x T)      (frozen)
  projector, per image:        P x (2 | 4 | 6) N_proj

An anyres model (LLaVA-NeXT / OneVision) runs the tower and projector once per tile, so an
image costs its number of tiles times the above (T and P per tile). Only the tiles the tower
runs on count: `model_flops(..., tiles=R)` with R the real tiles of the batch when the
tower skips the zero ones (`tile_budget`), B x N x T (every slot) when it does not.

N_dec excludes the input embedding (a gather) and includes the LM head (tied or not);
N_vis excludes the position/class embeddings and the unused post_layernorm, and counts
only the layers up to the deepest selected hidden state; T is the vision tower's tokens
(class token included), P the visual tokens the projector emits.

`model_flops` counts one step of each mode (train, prefill, decode) with its formula;
`mfu` turns it into model FLOPs utilization against `peak_tflops`. The trainer's logged
MFU and `lvm.bench` both count this way. Both also count on real tokens only (padding left
out, each packed sample attending within itself, the tower on the image slots or tiles that
hold one): `lvm.bench` from the batch's sample lengths and images (`model_flops(...,
samples=, images= | tiles=)`), the trainer from counts its step takes on the device
(`real_counts`, `real_step_flops`).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lvm.models
from lvm import lora
from lvm.models import anyres_model

# Dense bf16 peak TFLOP/s per chip (DESIGN.md), matched against `device.device_kind`
# (first match wins); MFU is reported only where the peak is known.
PEAK_TFLOPS = (
    ('H200', 989.0),
    ('H100', 989.0),
    ('TPU v6', 918.0),  # v6e ('TPU v6 lite')
    ('TPU v5 lite', 197.0),  # v5e
    ('TPU v5e', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),  # v5p reports 'TPU v5'
    ('TPU v4', 275.0),
)


def peak_tflops(device) -> float | None:
  """The dense bf16 peak of `device` in TFLOP/s, or None where none is known (CPU)."""
  if device.platform == 'cpu':
    return None
  kind = getattr(device, 'device_kind', '').lower()
  for name, peak in PEAK_TFLOPS:
    if name.lower() in kind:
      return peak
  return None


# The trainable-parameter regexes of LLaVA's two stages (as lvm.optim.STAGES).
PRETRAIN = r'^projector/'
FINETUNE = r'^(projector|decoder)/'


def _size(shape) -> int:
  return int(np.prod(shape.shape))


def param_counts(config) -> dict[str, int]:
  """Parameter counts by part (abstract: nothing is allocated)."""
  flat = lvm.models.abstract_params(config)
  counts = {'vision': 0, 'projector': 0, 'decoder': 0}
  for path, shape in flat.items():
    part = path.split('/')[0]  # an anyres model's image_newline goes with the projector
    counts[part if part in counts else 'projector'] += _size(shape)
  counts['decoder_embed'] = _size(flat['decoder/embed_tokens'])
  counts['total'] = sum(counts[p] for p in ('vision', 'projector', 'decoder'))
  return counts


def _layer_index(path: str) -> int | None:
  m = re.search(r'/layers_(\d+)/', path)
  return int(m.group(1)) if m else None


def _matmul_params(config, trainable: str):
  """(N, N_trainable) per part, as the FLOP rule counts them (see the module docstring)."""
  model_config = config.model if 'model' in config else config
  tower = lvm.models.build_vision(model_config)
  used_layers = max(tower._resolved_layers())  # pylint: disable=protected-access
  pattern = re.compile(trainable)
  flat = lvm.models.abstract_params(model_config, scan_layers=False)
  n = {'vision': 0, 'projector': 0, 'decoder': 0}
  n_train = dict(n)
  tied = model_config.decoder.tie_embeddings
  for path, shape in flat.items():
    part = path.split('/')[0]
    if part not in n:
      continue  # an anyres model's image_newline: added, not multiplied
    size = _size(shape)
    if part == 'vision':
      if path in ('vision/position_embedding', 'vision/class_embedding') or (
          'post_layernorm' in path):
        continue
      layer = _layer_index(path)
      if layer is not None and layer >= used_layers:
        continue
    if path == 'decoder/embed_tokens' and not tied:
      continue  # a gather, not a matmul (a tied one is also the LM head)
    n[part] += size
    if pattern.search(path):
      n_train[part] += size
  any_trainable = {p: any(pattern.search(k) for k in flat if k.startswith(p + '/'))
                   for p in n}
  return n, n_train, any_trainable, used_layers


def per_token(config, seq_len: int, trainable: str = FINETUNE) -> dict:
  """Decoder training FLOPs per token of a length-`seq_len` sequence.

  Args:
    config: the full config or `config.model`.
    seq_len: L, the attended length.
    trainable: regex over '/'-joined parameter paths (lvm.optim's stage regexes).

  Returns:
    dict: 'total', 'matmul', 'attention', 'n_decoder', 'n_decoder_trainable', 'formula'.
  """
  model_config = config.model if 'model' in config else config
  n, n_train, any_trainable, _ = _matmul_params(model_config, trainable)
  d = model_config.decoder
  head_dim = d.head_dim or d.width // d.heads
  grad_flows = any(any_trainable.values())
  matmul = 2 * n['decoder'] + (2 * n['decoder'] if grad_flows else 0) + 2 * n_train['decoder']
  attention = (3 if grad_flows else 1) * 2 * d.depth * d.heads * head_dim * seq_len
  mult = matmul // max(n['decoder'], 1)
  formula = (f'{mult} x N_dec + {3 if grad_flows else 1} x 2 x layers x heads x head_dim x L = '
             f'{mult} x {n["decoder"]:,} + {3 if grad_flows else 1} x 2 x {d.depth} x {d.heads} x '
             f'{head_dim} x {seq_len}')
  return {'total': matmul + attention, 'matmul': matmul, 'attention': attention,
          'n_decoder': n['decoder'], 'n_decoder_trainable': n_train['decoder'],
          'formula': formula}


def lm_head_per_position(config, trainable: str = FINETUNE) -> dict:
  """The LM head's share of `per_token`: what a position without logits does not cost.

  Training with `train.max_scored_tokens` = P runs the head at P positions of a row, not L.

  Returns:
    dict: 'total' (FLOPs per position), 'mult', 'n_head' (V x D).
  """
  model_config = config.model if 'model' in config else config
  _, _, any_trainable, _ = _matmul_params(model_config, trainable)
  d = model_config.decoder
  head = 'decoder/embed_tokens' if d.tie_embeddings else 'decoder/lm_head/kernel'
  n_head = d.vocab_size * d.width
  mult = 2 + (2 if any(any_trainable.values()) else 0) + (
      2 if re.search(trainable, head) else 0)
  return {'total': mult * n_head, 'mult': mult, 'n_head': n_head}


def per_image(config, trainable: str = FINETUNE, tiles: int | None = None) -> dict:
  """Vision tower + projector training FLOPs per image.

  Args:
    config: the full config or `config.model`.
    trainable: as `per_token`.
    tiles: anyres models: tower passes of the image (its base and grid tiles); default:
      every tile slot, `lvm.models.anyres_model.num_tiles`. Fixed-size models: ignored.

  Returns:
    dict: 'total', 'vision', 'projector', 'tokens' (T), 'visual_tokens' (P), 'formula'
    (anyres: T and P per tile).
  """
  model_config = config.model if 'model' in config else config
  n, n_train, any_trainable, used_layers = _matmul_params(model_config, trainable)
  v = model_config.vision
  tower = lvm.models.build_vision(model_config)
  t = tower.num_patches + int(tower.has_class_token)
  passes = 1
  if model_config.anyres.pinpoints:
    passes = tiles or anyres_model.num_tiles(model_config)
    p = lvm.models.build_projector(model_config).tokens_out(tower.num_tokens)
  else:
    p = lvm.models.num_image_tokens(model_config)
  vis_grad = any_trainable['vision']
  vision = t * (2 * n['vision'] + 4 * used_layers * v.width * t)
  if vis_grad:  # input gradients through the whole tower, weight gradients where trainable
    vision = 3 * vision - 2 * t * (n['vision'] - n_train['vision'])
  projector = p * (2 * n['projector'] + (2 * n['projector'] if vis_grad else 0)
                   + 2 * n_train['projector'])
  formula = (f'vision T x (2 x N_vis + 4 x layers_v x width_v x T) + projector P x k x N_proj; '
             f'T={t} N_vis={n["vision"]:,} layers_v={used_layers} width_v={v.width} P={p} '
             f'N_proj={n["projector"]:,}')
  if model_config.anyres.pinpoints:
    vision, projector = passes * vision, passes * projector
    formula = f'{passes} tiles x ({formula})'

  return {'total': vision + projector, 'vision': vision, 'projector': projector, 'tokens': t,
          'visual_tokens': p, 'formula': formula}


def per_step(config, batch_size: int, seq_len: int, images_per_sample: int,
             trainable: str = FINETUNE, scored_tokens: int = 0) -> int:
  """Training FLOPs of one step: B x L tokens and B x N images; with `scored_tokens` P > 0
  the LM head counts at B x P positions only."""
  unscored = batch_size * (seq_len - scored_tokens) if scored_tokens else 0
  return (batch_size * seq_len * per_token(config, seq_len, trainable)['total']
          - unscored * lm_head_per_position(config, trainable)['total']
          + batch_size * images_per_sample * per_image(config, trainable)['total'])


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_tflops_per_device: float) -> float:
  """Model FLOPs utilization: achieved / peak (peak bf16 dense, e.g. H100 SXM 989 TFLOP/s)."""
  return flops_per_step / step_seconds / (num_devices * peak_tflops_per_device * 1e12)


def segment_lengths(segment_ids) -> list[list[int]]:
  """Per row of a packed batch's int[B, L] `segment_ids`, its samples' lengths (0: padding)."""
  rows = []
  for row in np.asarray(segment_ids):
    ids, counts = np.unique(row[row > 0], return_counts=True)
    rows.append([int(c) for _, c in sorted(zip(ids, counts))])
  return rows


def model_flops(config, batch_size: int, seq_len: int, mode: str = 'train',
                cache_len: int = 0, tiles: int | None = None,
                samples: list[list[int]] | None = None,
                images: int | None = None) -> dict[str, Any]:
  """Model FLOPs of one step of `mode` (DESIGN.md's rule) and the formula.

  train: `per_step` with the config's trainable stage. prefill: the same count with
  nothing trainable (forward only). decode: one token per row, 2 x N_dec plus
  attention to `cache_len` keys, 4 x layers x heads x head_dim x cache_len (no causal
  halving). `tiles`: anyres models, the tiles the tower runs on in the step (default every
  slot, B x N x T); fixed-size models ignore it.

  Real tokens only (packed rows, `data.packing`): `samples` gives each row's sample lengths
  (`segment_lengths`); the decoder is then counted on those tokens, each attending within
  its sample (L_s x per-token FLOPs at length L_s), and not on the rows' padding; `images`,
  the images the batch holds (default every slot, B x N), counts the tower on those only.

  Returns:
    dict with 'total', 'parts' (decoder, vision, projector), 'tokens' and 'formula'.
  """
  # With LoRA the base weights are frozen (adapter FLOPs, r/D of a layer's, are not counted).
  regex = lora.trainable_regex(config) if mode == 'train' else r'$^'  # $^: nothing
  token = per_token(config, seq_len, regex)
  if mode == 'decode':
    d = config.model.decoder
    attn_width = d.depth * d.heads * (d.head_dim or d.width // d.heads)
    n_dec = token['n_decoder']
    parts = {'decoder': batch_size * (2 * n_dec + 4 * attn_width * cache_len), 'vision': 0,
             'projector': 0}
    formula = (f'B x (2 x N_dec + 4 x layers x heads x head_dim x S) = {batch_size} x '
               f'(2 x {n_dec:,} + 4 x {attn_width} x {cache_len})')
    tokens = batch_size
  else:
    images = images if images is not None else batch_size * config.data.max_images
    image = per_image(config, regex)
    if config.model.anyres.pinpoints:  # counted per tile
      image = per_image(config, regex, tiles=1)
      images = tiles or images * anyres_model.num_tiles(config.model)
    decoder = batch_size * seq_len * token['total']
    tokens = batch_size * seq_len
    if samples is not None:
      # per_token(L) = matmul + attention(L), with attention linear in the attended length.
      per_key = token['attention'] // seq_len
      decoder = sum(n * token['matmul'] + n * n * per_key for row in samples for n in row)
      tokens = sum(sum(row) for row in samples)
    parts = {'decoder': decoder,
             'vision': images * image['vision'], 'projector': images * image['projector']}
    what = 'tiles' if config.model.anyres.pinpoints else 'images'
    formula = (f"B*L x ({token['formula']}) + {what} x ({image['formula']}); "
               f'B={batch_size} L={seq_len} N={config.data.max_images} {what}={images}')
    if samples is not None:
      formula = (f"sum over samples of L_s x (the same at L = L_s) + {what} x "
                 f"({image['formula']}); {sum(map(len, samples))} samples, {tokens} real "
                 f"tokens of B*L={batch_size * seq_len}, {what}={images}; per token at L: "
                 f"{token['formula']}")
    if mode == 'train' and config.data.get('vision_features_cache'):
      parts['vision'] = 0  # the step reads the tower's features (lvm.data.feature_cache)
      formula += '; vision cached (data.vision_features_cache): not run'
    scored = int(config.train.max_scored_tokens) if mode == 'train' else 0
    if scored:  # the LM head runs at P positions of a row, not L
      head = lm_head_per_position(config, regex)
      counted = [sum(row) for row in samples] if samples is not None else [seq_len] * batch_size
      parts['decoder'] -= sum(max(n - scored, 0) for n in counted) * head['total']
      formula += (f" - (row tokens - P) x {head['mult']} x N_head per row; P={scored} "
                  f"N_head={head['n_head']:,}")
  return {'total': int(sum(parts.values())), 'parts': parts, 'tokens': tokens,
          'formula': formula}


def real_counts(batch, scored_tokens: int = 0) -> dict:
  """What of a batch is real, for MFU on real tokens: jnp float32 scalars, computed in the
  jitted step (`lvm.step.train_step`) so that nothing is read back per step.

  'real_tokens': the attended positions (not padding); 'attended_pairs': the sum over
  samples of L_s^2 (each token attends within its sample: packed rows by their
  `segment_ids`, else a row is one sample); 'unscored_real': the sum over rows of
  max(real - P, 0), the real positions without logits when `scored_tokens` P > 0, else 0;
  'real_images': the image slots that hold an image (anyres: tiles), by their nonzero
  pixels (or cached features), as `lvm.bench` counts them: text-only samples' and unused
  tiles' slots are zeros. `real_step_flops` turns these into FLOPs. Nothing for a batch
  without `attention_mask`.
  """
  if 'attention_mask' not in batch:
    return {}
  attended = batch['attention_mask'].astype(jnp.float32)
  per_row = jnp.sum(attended, axis=1)
  if 'segment_ids' in batch:
    segments = batch['segment_ids']
    def row_pairs(seg, mask):  # sum over positions of their sample's length = sum L_s^2
      lengths = jax.ops.segment_sum(mask, seg, num_segments=seg.shape[0] + 1)
      return jnp.sum(jnp.where(seg > 0, lengths[seg], 0.0))
    pairs = jnp.sum(jax.vmap(row_pairs)(segments, attended))
  else:
    pairs = jnp.sum(per_row ** 2)
  unscored = (jnp.sum(jnp.maximum(per_row - scored_tokens, 0.0)) if scored_tokens
              else jnp.zeros((), jnp.float32))
  return {'real_tokens': jnp.sum(per_row), 'attended_pairs': pairs, 'unscored_real': unscored,
          'real_images': real_image_slots(batch)}


def real_image_slots(batch):
  """Slots of `images` [B, N, H, W, 3] / anyres [B, N, T, H, W, 3] (or `image_features`
  [B, N, P, Dv]) that are not all zeros, a float32 scalar; 0 for a batch without images."""
  if 'images' in batch:
    x = batch['images']
    per_slot = 3 if x.ndim == 6 else 2  # the leading axes that index one slot (one tile)
  elif 'image_features' in batch:
    x, per_slot = batch['image_features'], 2
  else:
    return jnp.zeros((), jnp.float32)
  filled = jnp.any(x != 0, axis=tuple(range(per_slot, x.ndim)))
  return jnp.sum(filled.astype(jnp.float32))


def real_step_flops_fn(config):
  """`real_step_flops` for `config`, its per-count rates worked out once (each needs the
  model's parameter shapes): the trainer calls it at every logged step."""
  regex = lora.trainable_regex(config)
  seq_len = config.data.seq_len
  token = per_token(config, seq_len, regex)
  per_key = token['attention'] // seq_len
  # The tower and projector on one image slot (anyres: one tile; 0 with cached features).
  one = model_flops(config, config.train.batch_size, seq_len, images=1, tiles=1)['parts']
  per_slot = one['vision'] + one['projector']
  head = lm_head_per_position(config, regex)['total'] if config.train.max_scored_tokens else 0

  def flops(real_tokens: float, attended_pairs: float, real_images: float,
            unscored_real: float = 0.0) -> float:
    return float(real_tokens * token['matmul'] + attended_pairs * per_key
                 - unscored_real * head + real_images * per_slot)
  return flops


def real_step_flops(config, real_tokens: float, attended_pairs: float, real_images: float,
                    unscored_real: float = 0.0) -> float:
  """Training FLOPs of one step counted on its real tokens (`real_counts`): the decoder on
  the real tokens, each attending within its sample, the LM head not at unscored positions,
  and the tower and projector on the `real_images` slots that hold an image (anyres: real
  tiles). The same count as `model_flops(..., samples=segment_lengths(...),
  images=real_images)` (anyres: `tiles=real_images`) at the batch's own lengths."""
  return real_step_flops_fn(config)(real_tokens, attended_pairs, real_images, unscored_real)


def train_step_flops(config) -> float | None:
  """Model FLOPs of one train step of `config` (its batch, length, images and stage)."""
  try:
    return float(model_flops(config, config.train.batch_size, config.data.seq_len)['total'])
  except Exception:  # pylint: disable=broad-except
    return None  # No MFU rather than no training.
