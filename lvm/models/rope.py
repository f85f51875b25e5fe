"""Rotary position embeddings: the inverse frequencies of every RoPE type transformers has
for LLaMA-style decoders, and the rotation.

Types (`model.decoder.rope_scaling['type']`; None is the plain RoPE of `rope_theta`):

- linear (factor): positions / factor.
- dynamic (factor, original_max_position_embeddings = transformers' max_position_embeddings):
  NTK, the base grown with max(position) + 1 past the trained length.
- yarn (factor, original_max_position_embeddings; beta_fast, beta_slow, attention_factor,
  mscale, mscale_all_dim, truncate): a ramp between interpolated and extrapolated
  frequencies; cos and sin multiplied by the attention factor.
- llama3 (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
  Llama 3.1's smoothing.

The formulas are those of transformers' `modeling_rope_utils.py`, in float32.
"""

import math

import jax.numpy as jnp
import numpy as np

# type -> the keys it reads (required, optional with their transformers defaults).
TYPES = {
    'linear': (('factor',), {}),
    'dynamic': (('factor', 'original_max_position_embeddings'), {}),
    'yarn': (('factor', 'original_max_position_embeddings'),
             dict(beta_fast=32.0, beta_slow=1.0, attention_factor=None, mscale=None,
                  mscale_all_dim=None, truncate=True)),
    'llama3': (('factor', 'low_freq_factor', 'high_freq_factor',
                'original_max_position_embeddings'), {}),
}


def check_scaling(scaling: dict | None) -> list[str]:
  """The problems of a `rope_scaling` dict (unknown type, missing or unknown keys)."""
  if not scaling:
    return []
  scaling = dict(scaling)
  kind = scaling.get('type')
  if kind not in TYPES:
    return [f"type {kind!r} is not a supported RoPE type; supported: None (default), "
            f"{', '.join(repr(t) for t in TYPES)}"]
  required, optional = TYPES[kind]
  problems = [f'{kind!r} needs key {k!r}' for k in required if scaling.get(k) is None]
  extra = sorted(set(scaling) - {'type', *required, *optional})
  if extra:
    problems.append(f'{kind!r} does not read key(s) {extra}; it reads '
                    f'{sorted({*required, *optional})}')
  return problems


def _base_inv_freq(head_dim: int, theta) -> np.ndarray:
  return (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
          ).astype(np.float32)


def attention_factor(scaling: dict | None) -> float:
  """The factor transformers multiplies cos and sin by (YaRN's mscale; 1 for the others)."""
  if not scaling or scaling.get('type') != 'yarn':
    return 1.0
  s = {**TYPES['yarn'][1], **dict(scaling)}
  if s['attention_factor'] is not None:
    return float(s['attention_factor'])
  mscale = lambda scale, m=1.0: 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0
  if s['mscale'] and s['mscale_all_dim']:
    return float(mscale(s['factor'], s['mscale']) / mscale(s['factor'], s['mscale_all_dim']))
  return float(mscale(s['factor']))


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
             seq_len=None):
  """Inverse frequencies float32[Dh/2].

  numpy for every type but 'dynamic' with a traced `seq_len`: they depend only on the
  config, so the RoPE tables of a forward without a cache are constants of the program.

  Args:
    head_dim: the rotated head width.
    theta: the RoPE base.
    scaling: None or a `rope_scaling` dict (see the module docstring).
    seq_len: 'dynamic' only: the length the frequencies are for, max(position) + 1 (an int,
      or a traced scalar while decoding); transformers grows the base past the trained length.
  """
  scaling = dict(scaling) if scaling else None
  problems = check_scaling(scaling)
  if problems:
    raise ValueError(f'rope_scaling {scaling}: {"; ".join(problems)}')
  base = _base_inv_freq(head_dim, theta)
  if not scaling:
    return base
  kind, factor = scaling['type'], np.float32(scaling['factor'])
  if kind == 'linear':
    return base / factor
  if kind == 'dynamic':
    old_len = scaling['original_max_position_embeddings']
    xp = np if isinstance(seq_len, (int, np.integer)) or seq_len is None else jnp
    seq_len = xp.maximum(old_len if seq_len is None else seq_len, old_len).astype(xp.float32)
    grown = theta * ((factor * seq_len / old_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    return (1.0 / (grown.astype(xp.float32) ** exponent)).astype(xp.float32)
  if kind == 'yarn':
    return _yarn(head_dim, theta, {**TYPES['yarn'][1], **scaling})
  # llama3
  low, high = np.float32(scaling['low_freq_factor']), np.float32(scaling['high_freq_factor'])
  old_len = np.float32(scaling['original_max_position_embeddings'])
  wavelen = np.float32(2 * math.pi) / base
  scaled = np.where(wavelen > old_len / low, base / factor, base)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(head_dim: int, theta: float, s: dict) -> np.ndarray:
  """YaRN's frequencies: interpolated below the low-rotation bound, extrapolated above the
  high one, a linear ramp between (transformers' `_compute_yarn_parameters`)."""
  factor, old_len = s['factor'], s['original_max_position_embeddings']

  def correction_dim(rotations):
    return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(s['beta_fast'] or 32), correction_dim(s['beta_slow'] or 1)
  if s['truncate']:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
  return (interpolated * (1 - extrapolation_weight)
          + extrapolated * extrapolation_weight).astype(np.float32)


def tables(positions, head_dim: int, theta: float, scaling: dict | None = None):
  """(cos, sin) float32[B, T, Dh/2] of positions int[B, T], once for every layer.

  With numpy positions (a forward without a cache) the tables are computed in numpy,
  constants of the compiled program. Computed in the graph, XLA fused them into the rotation
  and its CPU loops evaluated cos and sin again for every element of q and k, in every layer
  (docs/performance.md, "Third round").
  """
  scaling = dict(scaling) if scaling else None
  xp = np if isinstance(positions, np.ndarray) else jnp
  seq_len = None
  if scaling and scaling['type'] == 'dynamic':
    seq_len = (int(positions.max()) + 1) if xp is np else jnp.max(positions) + 1
  freq = inv_freq(head_dim, theta, scaling, seq_len)
  if not isinstance(freq, np.ndarray):
    xp = jnp
  freqs = positions[..., None].astype(xp.float32) * freq
  cos, sin = xp.cos(freqs), xp.sin(freqs)
  factor = attention_factor(scaling)
  if factor != 1.0:
    cos, sin = cos * xp.float32(factor), sin * xp.float32(factor)
  return jnp.asarray(cos), jnp.asarray(sin)


def apply(x, cos, sin):
  """Rotates x[B, T, H, Dh] by `tables` (the rotate-half convention)."""
  b, t, h, dh = x.shape
  cos = cos[:, :, None, None, :]
  sin = sin[:, :, None, None, :]
  sin = jnp.concatenate([-sin, sin], axis=3)  # [B, T, 1, 2, Dh/2]
  # The halves as an axis of 2 and rotate-half as its reversal: the same products and
  # sums as concatenate([-x2, x1]), without a concatenate inside the elementwise loop.
  x32 = x.astype(jnp.float32).reshape(b, t, h, 2, dh // 2)
  out = x32 * cos + x32[..., ::-1, :] * sin
  return out.reshape(b, t, h, dh).astype(x.dtype)
