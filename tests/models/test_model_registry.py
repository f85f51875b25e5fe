"""The model registries: kinds registered in a test file are built by `lvm.models.build`, and
each kind's own config check (moved out of lvm/validate.py) reports its faults."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import config as common
from configs import tiny
from lvm import kernels
from lvm import registry
import lvm.models
from lvm.models import layers


class BagDecoder(nn.Module):
  """A toy decoder family: logits = (running mean of the embeddings) @ W."""
  vocab_size: int
  width: int
  matmul_impl: str

  def setup(self):
    self.embed_tokens = self.param('embed_tokens', nn.initializers.normal(1.0),
                                   (self.vocab_size, self.width))
    self.head = layers.Dense(self.vocab_size, ('embed',), ('vocab',), matmul_impl=self.matmul_impl)

  def embed(self, input_ids):
    return jnp.take(self.embed_tokens, input_ids, axis=0)

  def __call__(self, x, positions=None, attention_mask=None, cache=None, cache_index=None,
               logit_positions=None):
    mean = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
    return self.head(mean), None


def build_bag(model_config, impls: kernels.Impls):
  return BagDecoder(vocab_size=model_config.decoder.vocab_size, width=model_config.decoder.width,
                    matmul_impl=impls.matmul)


class MeanPool(nn.Module):
  """A toy projector: one visual token per image, the mean of its features, projected."""
  width: int
  matmul_impl: str

  def tokens_out(self, num_tokens: int) -> int:
    del num_tokens
    return 1

  @nn.compact
  def __call__(self, feats):
    pooled = feats.mean(axis=1, keepdims=True)
    return layers.Dense(self.width, ('embed_in',), ('embed',), matmul_impl=self.matmul_impl)(pooled)


def build_mean_pool(model_config, impls: kernels.Impls):
  return MeanPool(width=model_config.decoder.width, matmul_impl=impls.matmul)


@pytest.fixture
def toy_kinds():
  registry.DECODER.register('bag', build_bag)
  registry.PROJECTOR.register('mean_pool', build_mean_pool)
  yield
  registry.DECODER.unregister('bag')
  registry.PROJECTOR.unregister('mean_pool')


def test_build_picks_up_kinds_registered_in_a_test(toy_kinds):
  config = tiny.get_config()
  config.model.decoder.kind, config.model.projector.kind = 'bag', 'mean_pool'
  model = lvm.models.build(config)
  assert isinstance(model.decoder, BagDecoder) and isinstance(model.projector, MeanPool)
  assert model.decoder.matmul_impl == model.projector.matmul_impl == 'cpu'  # 'auto' on the CPU
  assert lvm.models.num_image_tokens(config) == model.tokens_per_image == 1

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 1, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray([[510, 5, 6, 7], [3, 510, 9, 2]], jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)['params'])
  logits = jax.jit(model.apply)({'params': params}, images, ids)

  # The same numbers by hand: the pooled, projected image at each image token.
  feats = model.vision.apply({'params': params['vision']}, images[:, 0])
  proj = params['projector']['Dense_0']['kernel']
  visual = np.asarray(feats).mean(axis=1) @ np.asarray(proj)  # [B, D]
  table = params['decoder']['embed_tokens']
  x = np.where((ids == 510)[..., None], visual[:, None], table[np.where(ids == 510, 0, ids)])
  mean = np.cumsum(x, axis=1) / np.arange(1, 5)[None, :, None]
  want = mean @ params['decoder']['head']['kernel']
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_unregistered_kinds_fail_naming_the_key_and_the_choices(toy_kinds):
  config = tiny.get_config()
  registry.DECODER.unregister('bag')
  config.model.decoder.kind = 'bag'
  with pytest.raises(ValueError, match=r"config\.model\.decoder\.kind='bag'.*'llama', 'mistral'"):
    lvm.models.build(config)


def test_registered_model_kinds():
  assert registry.VISION.names() == ('clip', 'siglip')
  assert registry.DECODER.names() == ('gemma', 'gemma2', 'llama', 'mistral', 'qwen2', 'qwen3')
  assert {'linear', 'downsample_mlp', 'identity'} < set(registry.PROJECTOR.names())
  assert registry.PROJECTOR.get('mlp3x_gelu') is registry.PROJECTOR.get('mlp2x_relu')


def test_vision_defaults_are_the_configs():
  for kind in ('clip', 'siglip'):
    for key, value in registry.VISION.get(kind).defaults().items():
      assert common.vision_config(kind)[key] == value


def _check(reg, config, kind) -> str:
  problems = registry.Problems()
  reg.get(kind).check(config, problems)
  return '\n'.join(problems.lines)


def test_a_valid_config_has_no_problems():
  config = tiny.get_config()
  for reg, key in ((registry.VISION, 'vision'), (registry.DECODER, 'decoder'),
                   (registry.PROJECTOR, 'projector')):
    assert _check(reg, config, config.model[key].kind) == ''


def test_vision_check():
  config = tiny.get_config()
  v = config.model.vision
  v.image_size, v.heads, v.feature_layer, v.select, v.mlp_dim = 30, 5, 7, 'cls', 0
  text = _check(registry.VISION, config, 'clip')
  assert 'config.model.vision.image_size: 30 is not a multiple of patch_size 8' in text
  assert 'config.model.vision.heads: vision width 32 is not divisible by heads 5' in text
  assert 'config.model.vision.feature_layer: 7 is out of range for a tower of depth 2' in text
  assert "config.model.vision.select: unknown value 'cls'" in text
  assert 'config.model.vision.mlp_dim: must be a positive integer, got 0' in text


def test_decoder_check():
  config = tiny.get_config()
  d = config.model.decoder
  d.heads, d.kv_heads = 6, 4
  config.model.image_token_id = 600
  config.model.pad_token_id = 600
  text = _check(registry.DECODER, config, 'llama')
  assert 'config.model.decoder.kv_heads: heads 6 is not a multiple of kv_heads 4' in text
  assert 'config.model.decoder.heads: width 64 is not divisible by heads 6' in text
  assert 'config.model.image_token_id: 600 is outside the vocabulary [0, 512)' in text
  assert 'config.model.pad_token_id: equals model.image_token_id' in text
  d.head_dim = 16
  assert 'width 64 is not divisible' not in _check(registry.DECODER, config, 'llama')


def test_projector_check():
  config = tiny.get_config()
  config.model.projector.kind = 'mlp2x_swishy'
  assert 'config.model.projector.kind:' in _check(registry.PROJECTOR, config, 'mlp2x_swishy')
  config.model.projector.kind = 'mlp0x_gelu'
  assert 'depth must be >= 1' in _check(registry.PROJECTOR, config, 'mlp0x_gelu')


def test_validation_picks_up_kinds_registered_in_a_test(toy_kinds):
  """`lvm.validate` asks the registries: a registered kind validates, its own check runs
  and reports through the same one-shot error, and nothing else lists the names."""
  from lvm import validate  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.decoder.kind, config.model.projector.kind = 'bag', 'mean_pool'
  validate.validate_config(config, 1)

  def check_bag(config, problems):
    if config.model.decoder.width % 3:
      problems.add('model.decoder.width', 'the bag decoder needs a multiple of 3', 'use 48')

  registry.DECODER.register('bag_checked', build_bag, check=check_bag)
  try:
    config.model.decoder.kind = 'bag_checked'
    with pytest.raises(ValueError, match=r'config\.model\.decoder\.width: the bag decoder'):
      validate.validate_config(config, 1)
    config.model.decoder.width = 48
    validate.validate_config(config, 1)
  finally:
    registry.DECODER.unregister('bag_checked')
  config.model.decoder.kind = 'bag_checked'
  with pytest.raises(ValueError, match=r"config\.model\.decoder\.kind: 'bag_checked' is not a "
                                       r'registered decoder family'):
    validate.validate_config(config, 1)


def test_a_vision_tower_registered_in_a_test_is_built_and_validated():
  """A new tower kind: the CLIP tower under another name whose builder records the call."""
  from lvm import validate  # pylint: disable=g-import-not-at-top
  from lvm.models import vision  # pylint: disable=g-import-not-at-top
  built = []

  def build_recording(model_config, impls):
    built.append(model_config.vision.kind)
    return vision.build_tower(model_config, impls)

  registry.VISION.register('clip_recorded', build_recording,
                           check=registry.VISION.get('clip').check)
  try:
    config = tiny.get_config()
    config.model.vision.kind = 'clip_recorded'
    validate.validate_config(config, 1)  # counts the tower's tokens: builds it too
    built.clear()
    model = lvm.models.build(config)
    assert built == ['clip_recorded'] and isinstance(model.vision, vision.VisionTower)
    config.model.vision.image_size = 30  # the registered check runs for the new kind too
    with pytest.raises(ValueError, match='is not a multiple of patch_size'):
      validate.validate_config(config, 1)
  finally:
    registry.VISION.unregister('clip_recorded')
