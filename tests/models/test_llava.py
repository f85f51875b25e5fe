"""lvm/models/llava.py: full-size shapes, the visual-token merge, and its error checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llava15
from configs import tiny
import lvm.models
from lvm.models import decoder as decoder_lib
from lvm.models import llava


def _torch_count(size):
  """transformers' parameter count for LLaVA-1.5 `size`, built on the meta device."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  dims = llava15.SIZES[size]
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
          num_attention_heads=16, image_size=336, patch_size=14, hidden_act='quick_gelu'),
      text_config=transformers.LlamaConfig(
          vocab_size=32064, hidden_size=dims['width'], intermediate_size=dims['mlp_dim'],
          num_hidden_layers=dims['depth'], num_attention_heads=dims['heads'],
          num_key_value_heads=dims['kv_heads']),
      image_token_index=32000)
  with torch.device('meta'):
    model = transformers.LlavaForConditionalGeneration(config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('size,expected', [('7b', 7_063_427_072), ('13b', 13_351_494_656)])
def test_full_size_param_count_equals_transformers(size, expected):
  shapes = lvm.models.abstract_params(llava15.get_config(size))  # jax.eval_shape: no memory
  ours = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert ours == _torch_count(size) == expected


@functools.lru_cache(maxsize=1)
def _tiny():
  """(model config, model, params, images) of configs/tiny.py, initialized once."""
  config = tiny.get_config().model
  model = lvm.models.build(config)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 32, 32, 3)), jnp.float32)
  ids = jnp.zeros((2, 40), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)['params']
  return config, model, nn.unbox(params), images


def test_merge_writes_visual_tokens_in_order():
  text = jnp.zeros((2, 6, 1))
  visual = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1)
  is_image = jnp.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  out = llava.merge_visual_tokens(text, visual, is_image)[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 0], [5, 0, 0, 0, 0, 0]])


def test_image_token_count_mismatch_is_an_error():
  config, model, params, images = _tiny()
  p = lvm.models.num_image_tokens(config)
  ids = np.ones((2, 40), np.int32)
  ids[0, 1:1 + p - 1] = config.image_token_id  # one token short of an image
  with pytest.raises(ValueError, match='Row 0 has 15 image tokens'):
    model.apply({'params': params}, images, ids)
  ids = np.ones((2, 3 * p + 4), np.int32)
  ids[1, :3 * p] = config.image_token_id  # 3 images' tokens, 2 image slots
  with pytest.raises(ValueError, match='Row 1 has 48 image tokens'):
    model.apply({'params': params}, images, ids)


def test_images_only_change_image_positions_and_later():
  config, model, params, images = _tiny()
  p = lvm.models.num_image_tokens(config)
  ids = np.full((2, 40), 7, np.int32)
  ids[0, 3:3 + p] = config.image_token_id
  apply = jax.jit(model.apply)
  a = apply({'params': params}, images, ids)
  b = apply({'params': params}, images * 0.5, ids)
  # Row 0 sees its image from position 3 on; row 1 has no image tokens: its padding
  # images are never read. Text-only (images=None) equals row 1.
  np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
  assert np.abs(a[0, 3:] - b[0, 3:]).max() > 1e-3
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  c = model.apply({'params': params}, None, ids[1:])
  np.testing.assert_allclose(c[0], a[1], atol=1e-5)


def test_remat_does_not_change_numbers():
  """Loss and gradients equal with and without rematerialization (on the decoder stack)."""
  kw = dict(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, scan_layers=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 32)), jnp.float32)
  plain = decoder_lib.Decoder(**kw)
  params = nn.unbox(jax.jit(plain.init)(jax.random.PRNGKey(0), x)['params'])

  def loss_and_grad(m):
    return jax.jit(jax.value_and_grad(lambda q: jnp.mean(m.apply({'params': q}, x)[0] ** 2)))(
        params)

  l1, g1 = loss_and_grad(plain)
  assert np.abs(g1['layers']['mlp']['up_proj']['kernel']).max() > 0
  for policy in ('full', 'dots'):
    l2, g2 = loss_and_grad(decoder_lib.Decoder(remat_policy=policy, **kw))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_random_params_are_one_init_in_either_layout():
  """An unrolled model's random params are its scanned twin's split by layer: the same
  weights for a seed, the unrolled init's tree, and the same logits."""
  scanned_config, unrolled_config = tiny.get_config().model, tiny.get_config('scan=0').model
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(np.r_[[510] * 16, np.arange(1, 17)][None].repeat(2, 0), jnp.int32)
  rng = jax.random.PRNGKey(3)
  scanned = jax.jit(lambda r: lvm.models.random_params(scanned_config, r, images, ids))(rng)
  unrolled = jax.jit(lambda r: lvm.models.random_params(unrolled_config, r, images, ids))(rng)
  model = lvm.models.build(unrolled_config)
  expected = nn.unbox(jax.eval_shape(model.init, rng, images, ids)['params'])
  assert jax.tree.structure(unrolled) == jax.tree.structure(expected)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), unrolled) == jax.tree.map(
      lambda a: (a.shape, a.dtype), expected)
  flat = lvm.models.traverse_util.flatten_dict(scanned, sep='/')
  split = lvm.models.unstack_layers(flat)
  for path, value in lvm.models.traverse_util.flatten_dict(unrolled, sep='/').items():
    np.testing.assert_array_equal(value, split[path], err_msg=path)
  assert {p.split('/')[0] for p in split if '/layers_1/' in p} == {'vision', 'decoder'}
  logits_scanned = lvm.models.build(scanned_config).apply({'params': scanned}, images, ids)
  logits_unrolled = model.apply({'params': unrolled}, images, ids)
  np.testing.assert_allclose(logits_unrolled, logits_scanned, rtol=1e-5, atol=1e-5)
