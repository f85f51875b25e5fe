"""Bicubic position-embedding interpolation equals torch's and transformers' CLIP/SigLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm.models import pos_embed

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

GRIDS = [(4, (6, 6)), (4, (2, 3)), (24, (27, 27)), (7, (16, 5)), (5, (1, 1)), (3, (10, 2)),
         (27, (37, 11)), (6, (6, 9)), (8, (4, 4))]


def torch_bicubic(grid, side, new):
  x = torch.tensor(grid).reshape(1, side, side, -1).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(x, size=new, mode='bicubic', align_corners=False)
  return out.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).numpy()


@pytest.mark.parametrize('side,new', GRIDS)
def test_equals_torch_bicubic(side, new):
  rng = np.random.default_rng(side * 100 + new[0])
  table = rng.standard_normal((side * side + 1, 8)).astype(np.float32)
  got = np.asarray(pos_embed.interpolate(table, new, has_cls=True))
  assert got.shape == (new[0] * new[1] + 1, 8)
  np.testing.assert_array_equal(got[0], table[0])  # The class embedding is kept as is.
  np.testing.assert_allclose(got[1:], torch_bicubic(table[1:], side, new), atol=1e-5, rtol=0)
  got = np.asarray(pos_embed.interpolate(table[1:], new, has_cls=False))
  np.testing.assert_allclose(got, torch_bicubic(table[1:], side, new), atol=1e-5, rtol=0)


def test_bicubic_matrix_is_torch_on_one_hot_inputs():
  # Each column of the matrix is the response to one input sample: exact weights, border taps
  # folded into the edge samples, a = -0.75 (not jax.image.resize's a = -0.5).
  for n_in, n_out in [(5, 9), (9, 5), (24, 37), (3, 1), (2, 7)]:
    eye = torch.eye(n_in)[:, None, :, None].expand(n_in, 1, n_in, 3)
    want = torch.nn.functional.interpolate(eye.contiguous(), size=(n_out, 3), mode='bicubic',
                                           align_corners=False)[:, 0, :, 1].numpy().T
    np.testing.assert_allclose(pos_embed.bicubic_matrix(n_in, n_out), want, atol=1e-6)
  keys = jax.image.resize(jnp.eye(5), (9, 5), 'cubic')
  assert np.abs(np.asarray(keys) - pos_embed.bicubic_matrix(5, 9)).max() > 1e-2


def test_same_grid_returns_the_table():
  table = jnp.arange(17 * 4, dtype=jnp.float32).reshape(17, 4)
  assert pos_embed.interpolate(table, (4, 4), has_cls=True) is table


def test_jits_with_static_grid_and_keeps_dtype():
  table = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)), jnp.bfloat16)
  fn = jax.jit(pos_embed.interpolate, static_argnums=(1, 2))
  out = fn(table, (5, 3), False)
  assert out.dtype == jnp.bfloat16 and out.shape == (15, 4)
  want = torch_bicubic(np.asarray(table, np.float32), 4, (5, 3))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)
  with pytest.raises(ValueError, match='not square'):
    pos_embed.interpolate(jnp.zeros((15, 4)), (2, 2), has_cls=False)


@pytest.mark.parametrize('height,width', [(42, 42), (35, 56), (14, 70), (28, 28)])
def test_clip_vision_embeddings_interpolate_pos_encoding(height, width):
  config = transformers.CLIPVisionConfig(hidden_size=8, image_size=28, patch_size=7,
                                         num_channels=3, num_attention_heads=2)
  torch.manual_seed(0)
  emb = transformers.models.clip.modeling_clip.CLIPVisionEmbeddings(config).eval()
  with torch.no_grad():
    emb.position_embedding.weight.normal_()
    pixels = torch.randn(1, 3, height, width)
    out = emb(pixels, interpolate_pos_encoding=True)[0].numpy()
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)[0]
    tokens = torch.cat([emb.class_embedding[None], patches]).numpy()
    hf_table = emb.interpolate_pos_encoding(torch.zeros(1, 1 + patches.shape[0], 8), height,
                                            width)[0].numpy()
  table = emb.position_embedding.weight.detach().numpy()
  got = np.asarray(pos_embed.interpolate(table, (height // 7, width // 7), has_cls=True))
  np.testing.assert_allclose(got, hf_table, atol=1e-5, rtol=0)
  np.testing.assert_allclose(tokens + got, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize('height,width', [(42, 42), (35, 56), (14, 70), (28, 28)])
def test_siglip_vision_embeddings_interpolate_pos_encoding(height, width):
  config = transformers.SiglipVisionConfig(hidden_size=8, image_size=28, patch_size=7,
                                           num_channels=3, num_attention_heads=2)
  torch.manual_seed(0)
  emb = transformers.models.siglip.modeling_siglip.SiglipVisionEmbeddings(config).eval()
  with torch.no_grad():
    emb.position_embedding.weight.normal_()
    pixels = torch.randn(1, 3, height, width)
    out = emb(pixels, interpolate_pos_encoding=True)[0].numpy()
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)[0].numpy()
  table = emb.position_embedding.weight.detach().numpy()
  got = np.asarray(pos_embed.interpolate(table, (height // 7, width // 7), has_cls=False))
  np.testing.assert_allclose(patches + got, out, atol=1e-5, rtol=0)
