"""Vision towers: CLIP ViT and SigLIP ViT, returning the hidden states LLaVA selects.

Layout follows transformers' CLIPVisionTransformer / SiglipVisionTransformer, so that
checkpoints map one to one (see lvm/hf). Letters: B images, P tokens, D width, H heads.
Both kinds register here (`lvm.registry.VISION`) with their builder, defaults and check.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm import kernels
from lvm import registry
from lvm.models import checks
from lvm.models import layers
from lvm.models import pos_embed
from lvm.models.layers import Dense, LayerNorm

SELECTS = ('patch', 'all', 'drop_first')


class VisionAttention(nn.Module):
  """Bidirectional multi-head attention with biases (CLIP/SigLIP self_attn)."""
  heads: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  matmul_impl: str = 'xla'

  @nn.compact
  def __call__(self, x):  # float[B, P, D] -> float[B, P, D]
    d = x.shape[-1]
    head_dim = d // self.heads
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
              matmul_impl=self.matmul_impl)
    proj = lambda name: Dense((self.heads, head_dim), ('embed',), ('heads', 'head_dim'),
                              name=name, **kw)
    q, k, v = proj('q_proj')(x), proj('k_proj')(x), proj('v_proj')(x)
    out = kernels.attention(self.attention_impl)(q, k, v)
    return Dense(d, ('heads', 'head_dim'), ('embed',), name='out_proj', **kw)(out)


class VisionMLP(nn.Module):
  mlp_dim: int
  act: str
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  matmul_impl: str = 'xla'

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
              matmul_impl=self.matmul_impl)
    h = Dense(self.mlp_dim, ('embed',), ('mlp',), name='fc1', **kw)(x)
    h = nn.with_logical_constraint(layers.activation(self.act)(h), ('batch', 'length', 'act_mlp'))
    return Dense(d, ('mlp',), ('embed',), name='fc2', **kw)(h)


class VisionBlock(nn.Module):
  """Pre-LN encoder layer; returns (x, x) so a scan also yields every hidden state."""
  heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  matmul_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.norm_eps, name='layer_norm1', **kw)(x)
    x = x + VisionAttention(self.heads, attention_impl=self.attention_impl,
                            matmul_impl=self.matmul_impl, name='self_attn', **kw)(h)
    h = LayerNorm(self.norm_eps, name='layer_norm2', **kw)(x)
    x = x + VisionMLP(self.mlp_dim, self.act, matmul_impl=self.matmul_impl, name='mlp', **kw)(h)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return x, x


class VisionTower(nn.Module):
  """CLIP or SigLIP ViT.

  Attributes:
    kind: 'clip' (class token, pre_layrnorm, quick_gelu) or 'siglip' (no class token,
      gelu_tanh, patch bias).
    feature_layers: indices into the hidden-state list (embeddings, layer 1, ...,
      layer depth), as in transformers' `hidden_states`; several are concatenated.
    select: 'patch' drops the class token (a no-op for SigLIP), 'all' keeps every
      token, 'drop_first' always drops token 0 (transformers' 'default' on SigLIP).
    attention_impl, matmul_impl: the kernels (`lvm.kernels`), resolved by `build`.
  """
  kind: str
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  norm_eps: float
  feature_layers: Sequence[int] = (-2,)
  select: str = 'patch'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  scan_layers: bool = False
  remat_policy: str = 'none'
  attention_impl: str = 'xla'
  matmul_impl: str = 'xla'

  @property
  def has_class_token(self) -> bool:
    return self.kind == 'clip'

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """Tokens per image after selection."""
    n = self.num_patches + int(self.has_class_token)
    dropped = {'all': 0, 'patch': int(self.has_class_token), 'drop_first': 1}[self.select]
    return n - dropped

  @property
  def out_features(self) -> int:
    return self.width * len(self.feature_layers)

  def _resolved_layers(self):
    n = self.depth + 1
    resolved = []
    for i in self.feature_layers:
      if not -n <= i < n:
        raise ValueError(f'vision feature_layer {i} out of range for depth {self.depth}')
      resolved.append(i % n)
    return resolved

  def embed(self, images):
    """images float[B, H, W, 3] -> embeddings float[B, P, D] (before the encoder).

    At another size than `image_size` the learned position table (made for the config's
    square grid) is resized bicubically to the `H // patch x W // patch` grid, as
    transformers' `interpolate_pos_encoding=True` (`lvm.models.pos_embed`).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    kernel = layers.param_with_axes(
        self, 'patch_embedding', layers.default_kernel_init,
        (self.patch_size, self.patch_size, 3, self.width), (None, None, None, 'embed'),
        self.param_dtype)
    x = jax.lax.conv_general_dilated(
        images.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.patch_size, self.patch_size), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.kind == 'siglip':
      bias = layers.param_with_axes(self, 'patch_bias', nn.initializers.zeros, (self.width,),
                                    ('embed',), self.param_dtype)
      x = x + bias.astype(self.dtype)
    b, gh, gw = x.shape[:3]
    x = x.reshape(b, gh * gw, self.width)
    if self.has_class_token:
      cls = layers.param_with_axes(self, 'class_embedding', layers.default_kernel_init,
                                   (self.width,), ('embed',), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    pos = layers.param_with_axes(
        self, 'position_embedding', layers.default_kernel_init,
        (self.num_patches + int(self.has_class_token), self.width), (None, 'embed'),
        self.param_dtype)
    pos = pos_embed.interpolate(pos, (gh, gw), has_cls=self.has_class_token)
    x = x + pos.astype(self.dtype)[None]
    if self.kind == 'clip':
      x = LayerNorm(self.norm_eps, name='pre_layrnorm', **kw)(x)
    return x

  @nn.compact
  def __call__(self, images):
    """images float[B, H, W, 3] (normalized) -> features float[B, P, len(feature_layers) * D].

    H, W: any sizes of at least one patch (`image_size` for the config's own grid; others
    interpolate the position embeddings, see `embed`); P follows the `H // patch x W // patch`
    grid (trailing pixels that fill no patch are dropped, as the convolution does).
    """
    if (images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] < self.patch_size
        or images.shape[2] < self.patch_size):
      raise ValueError(f'vision tower expects images [B, H, W, 3] of at least one '
                       f'{self.patch_size} px patch, got {images.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = 'quick_gelu' if self.kind == 'clip' else 'gelu_tanh'
    block_kw = dict(heads=self.heads, mlp_dim=self.mlp_dim, act=act, norm_eps=self.norm_eps,
                    attention_impl=self.attention_impl, matmul_impl=self.matmul_impl, **kw)
    wanted = self._resolved_layers()
    x = self.embed(images)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    hidden = {0: x}
    if self.scan_layers:
      block = layers.stack_blocks(VisionBlock, depth=self.depth, scan=True,
                                  remat_policy=self.remat_policy, in_axes=(nn.broadcast,))
      _, ys = block(name='layers', **block_kw)(x, None)
      for i in wanted:
        if i > 0:
          hidden[i] = ys[i - 1]
    else:
      block = layers.stack_blocks(VisionBlock, depth=self.depth, scan=False,
                                  remat_policy=self.remat_policy, in_axes=())
      # Layers past the deepest selected one do not change the features: create their
      # parameters at init (so checkpoints are complete) but skip them when applying.
      last = self.depth if self.is_initializing() else max(wanted)
      for i in range(last):
        x, _ = block(name=f'layers_{i}', **block_kw)(x)
        hidden[i + 1] = x
    if self.kind == 'clip':
      # Only the pooled output uses post_layernorm; LLaVA never reads it. Created so the
      # parameter set equals transformers' CLIPVisionModel.
      post = LayerNorm(self.norm_eps, name='post_layernorm', **kw)
      if self.is_initializing():
        post(x[:, 0])
    feats = jnp.concatenate([hidden[i] for i in wanted], axis=-1)
    if self.select == 'patch' and self.has_class_token or self.select == 'drop_first':
      feats = feats[:, 1:]
    elif self.select not in SELECTS:
      raise ValueError(f"vision select must be 'patch', 'all' or 'drop_first', got {self.select!r}")
    return feats


def feature_layers(vision_config) -> tuple[int, ...]:
  """`model.vision.feature_layer` (an index or a list of them) as a tuple of ints."""
  layer = vision_config.feature_layer
  return tuple(int(i) for i in layer) if isinstance(layer, (list, tuple)) else (int(layer),)


def build_tower(model_config, impls: kernels.Impls) -> VisionTower:
  """The tower of `model_config` (the full `config.model`), with the resolved kernels."""
  v = model_config.vision
  return VisionTower(
      kind=v.kind, image_size=v.image_size, patch_size=v.patch_size, width=v.width,
      depth=v.depth, heads=v.heads, mlp_dim=v.mlp_dim, norm_eps=v.norm_eps,
      feature_layers=feature_layers(v), select=v.select,
      dtype=layers.dtype(model_config.dtype), param_dtype=layers.dtype(model_config.param_dtype),
      scan_layers=model_config.scan_layers, remat_policy=model_config.remat_policy,
      attention_impl=impls.attention, matmul_impl=impls.matmul)


def check_tower(config, problems: registry.Problems):
  """`model.vision`'s own faults: sizes, the patch grid, heads, feature_layer, select."""
  v = config.model.vision
  checks.positive_ints(problems, v, 'model.vision',
                       ('image_size', 'patch_size', 'width', 'depth', 'heads', 'mlp_dim'))
  if checks.all_positive(v, ('image_size', 'patch_size')) and v.image_size % v.patch_size:
    problems.add('model.vision.image_size', f'{v.image_size} is not a multiple of patch_size '
                 f'{v.patch_size}', f'use a multiple of {v.patch_size} (e.g. '
                 f'{v.image_size // v.patch_size * v.patch_size or v.patch_size})')
  if checks.all_positive(v, ('width', 'heads')) and v.width % v.heads:
    problems.add('model.vision.heads', f'vision width {v.width} is not divisible by heads '
                 f'{v.heads}', 'pick heads dividing model.vision.width')
  if checks.all_positive(v, ('depth',)):
    try:
      wanted = feature_layers(v) if v.get('feature_layer') is not None else ()
    except (TypeError, ValueError):
      wanted = ()
    n = v.depth + 1
    if not wanted or any(not -n <= i < n for i in wanted):
      problems.add('model.vision.feature_layer', f'{v.get("feature_layer")!r} is out of range '
                   f'for a tower of depth {v.depth} ({n} hidden states)',
                   f'use indices in [-{n}, {n - 1}] (LLaVA-1.5: -2)')
  if v.get('select') not in SELECTS:
    problems.add('model.vision.select', f'unknown value {v.get("select")!r}',
                 f'use one of {list(SELECTS)}')


def check_vision(config, problems: registry.Problems):
  """The tower's own checks, and the anyres tiling it is run on (`model.anyres`)."""
  from lvm.models import anyres_model  # pylint: disable=g-import-not-at-top  (imports llava)
  check_tower(config, problems)
  anyres_model.check_anyres(config, problems)


# The fields where the kinds differ (the rest of `model.vision` is shared).
registry.VISION.register('clip', build_tower, check=check_vision,
                         defaults=lambda: {'norm_eps': 1e-5})
registry.VISION.register('siglip', build_tower, check=check_vision,
                         defaults=lambda: {'norm_eps': 1e-6})
