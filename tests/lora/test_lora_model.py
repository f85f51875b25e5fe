"""LoRA in the model (lvm/lora.py): exact base logits at init, merged == unmerged, every
layout (scan, unrolled, fused projections, remat), sharded on 8 devices == 1, and the bad
configs refused before compiling, naming the key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import lora
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib

import train_utils  # pylint: disable=import-error


def _config(**overrides):
  return train_utils.tiny_config(**{'lora.enable': True, 'lora.rank': 4, 'lora.alpha': 8.0,
                                    'data.seq_len': 32, **overrides})


def _inputs(config, batch=2):
  rng = np.random.default_rng(0)
  size, p = config.model.vision.image_size, models.num_image_tokens(config)
  images = rng.standard_normal((batch, 1, size, size, 3)).astype(np.float32)
  ids = rng.integers(1, 500, (batch, config.data.seq_len)).astype(np.int32)
  ids[:, 1:1 + p] = config.model.image_token_id
  return jnp.asarray(images), jnp.asarray(ids)


def _random_b(params):
  """Fresh adapters are zero: B given values so that they count."""
  flat = optim.flatten(params)
  for i, k in enumerate(sorted(k for k in flat if k.endswith('/lora_b'))):
    flat[k] = 0.05 * jax.random.normal(jax.random.key(10 + i), flat[k].shape)
  return optim.unflatten(flat)


def _apply(config, images, ids):
  model = models.build(config)
  f = jax.jit(lambda p: model.apply({'params': p}, images, ids))
  return lambda params: np.asarray(f(params))


@pytest.fixture(scope='module')
def lora_model():
  """(config, inputs, params with random B, their unmerged logits), LoRA on the decoder's
  attention and MLP and on the projector."""
  config = _config(**{'lora.targets': r'^(decoder/layers(_\d+)?|projector)/'})
  images, ids = _inputs(config)
  params = jax.jit(lambda r: models.random_params(config, r, images, ids))(jax.random.key(1))
  return config, (images, ids), params, _apply(config, images, ids)


def test_fresh_adapters_give_the_base_logits_exactly_and_merge_equals_unmerged(lora_model):
  config, inputs, params, lora_logits = lora_model
  flat = optim.flatten(params)
  adapted = sorted({k.rsplit('/', 1)[0] for k in flat if lora.is_adapter(k)})
  assert 'projector/linear_1' in adapted and 'decoder/layers/self_attn/o_proj' in adapted
  assert 'decoder/lm_head' not in adapted and not any(k.startswith('vision') for k in adapted)
  base_logits = _apply(_config(**{'lora.enable': False}), *inputs)
  base = base_logits(lora.strip(params))
  np.testing.assert_array_equal(lora_logits(params), base)

  params = _random_b(params)
  unmerged = lora_logits(params)
  assert np.abs(unmerged - base).max() > 1e-3  # the adapters change the logits
  merged = base_logits(lora.merge(jax.device_get(params), lora.spec(config)))
  np.testing.assert_allclose(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_unrolled_fused_and_remat_layouts_give_the_scanned_logits(lora_model):
  config, inputs, params, lora_logits = lora_model
  params = _random_b(params)
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers, unrolled.model.fuse_projections = False, True
  unrolled.model.remat_policy = 'full'
  flat = models.unstack_layers(optim.flatten(params))
  assert 'decoder/layers_1/mlp/up_proj/lora_b' in flat
  got = _apply(unrolled, *inputs)(optim.unflatten(flat))
  np.testing.assert_allclose(got, lora_logits(params), atol=1e-5, rtol=1e-5)


def test_adapters_are_sharded_like_their_base_weight_and_8_devices_match_1(lora_model):
  config, (images, ids), params, lora_logits = lora_model
  params = _random_b(params)
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  factory = _factory(config, (2, 2, 2))
  shardings = optim.flatten(factory.param_shardings)
  spec = lambda k: tuple(shardings[k].spec)[:3]
  # q_proj kernel [L, embed, heads, head_dim]: A takes its input axis, B its output axes.
  assert spec('decoder/layers/self_attn/q_proj/kernel') == (None, 'fsdp', 'tensor')
  assert spec('decoder/layers/self_attn/q_proj/lora_a') == (None, 'fsdp', None)
  assert spec('decoder/layers/self_attn/q_proj/lora_b') == (None, None, 'tensor')
  assert spec('projector/linear_2/lora_b') == (None, 'fsdp')
  sharded = jax.device_put(params, factory.param_shardings)
  model = models.build(config)
  with jax.set_mesh(factory.mesh), nn.logical_axis_rules(sharding.rules(config)):
    got = jax.jit(lambda p: model.apply({'params': p}, images, ids))(sharded)
  np.testing.assert_allclose(np.asarray(got), lora_logits(params), atol=1e-5, rtol=1e-5)


def _factory(config, mesh_shape=(1, 1, 1)):
  mesh = train_utils.mesh_for(config, mesh_shape)
  tx, _ = optim.make(config.optimizer, 10)
  return state_lib.StateFactory(config, models.build(config), tx, mesh, sharding.rules(config))


@pytest.mark.parametrize('overrides, key, words', [
    ({'lora.targets': '^decoder/no_such_layer'}, 'config.lora.targets', 'matches no Dense'),
    ({'lora.rank': 100}, 'config.lora.rank', 'exceeds the dimensions'),
    ({'train.stage': 'pretrain'}, 'config.lora.targets', 'no adapter would train'),
])
def test_bad_lora_configs_fail_before_compiling_naming_the_key(overrides, key, words):
  with pytest.raises(ValueError, match=key) as e:
    _factory(_config(**overrides))
  assert words in str(e.value)


def test_adapters_of_other_shapes_are_refused_naming_the_parameter():
  # What restoring a LoRA checkpoint onto its base does (lvm.lora.complete_params).
  base = {'decoder': {'layers': {'mlp': {'up_proj': {
      'kernel': jnp.zeros((2, 64, 128)), 'lora_a': jnp.zeros((2, 64, 4))}}}}}
  bad = {'decoder': {'layers': {'mlp': {'up_proj': {'lora_a': np.zeros((2, 64, 8))}}}}}
  with pytest.raises(ValueError, match=r'decoder/layers/mlp/up_proj/lora_a has shape'):
    state_lib.overlay_params(base, bad, 'LoRA checkpoint')


def test_llava15_lora_recipe_trains_adapters_and_projector_with_state_for_them_only():
  from configs import llava15  # pylint: disable=import-outside-toplevel
  config = llava15.get_config('size=7b,lora=1')
  config.mesh.data, config.mesh.fsdp = 1, 8
  factory = _factory(config)  # abstract: nothing of the 7B model is allocated
  flat = optim.flatten(factory.abstract_params)
  trainable = optim.flatten(optim.split(factory.abstract_params, factory.trainable)[0])
  size = lambda keys: sum(int(np.prod(flat[k].shape)) for k in keys)
  d, f, layers = 4096, 11008, 32
  adapters = layers * 128 * (4 * (d + d) + 2 * (d + f) + (f + d))  # q k v o, gate up, down
  assert size(k for k in trainable if lora.is_adapter(k)) == adapters == 319_815_680
  projector = 1024 * d + d + d * d + d
  assert sorted({k.split('/')[0] for k in trainable}) == ['decoder', 'projector']
  assert size(trainable) == adapters + projector
  opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract['opt_state'])
            if x.ndim)
  assert opt == 2 * (adapters + projector)  # Adam's mu and nu, nothing for the base
