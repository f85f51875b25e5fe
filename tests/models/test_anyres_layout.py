"""anyres model-side layout: packed features and token counts equal transformers'."""

import types

import jax
import numpy as np
from PIL import Image
import pytest

from lvm.data import anyres as data_anyres
from lvm.models import anyres

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
modeling_llava_next = transformers.models.llava_next.modeling_llava_next
modeling_llava_onevision = transformers.models.llava_onevision.modeling_llava_onevision

NEXT = data_anyres.LLAVA_NEXT_PINPOINTS
ONEVISION = data_anyres.onevision_pinpoints()
# Tiny towers with the same grids: 56 px tiles of 14 px patches (n = 4), 28 px of 7 (n = 4).
TINY_NEXT = tuple((h // 6, w // 6) for h, w in NEXT)
TINY_ONEVISION = data_anyres.onevision_pinpoints(28)

FIXED = [(336, 336), (1, 1), (7, 5), (5, 7), (300, 600), (600, 300), (224, 672), (672, 224),
         (100, 1000), (1000, 100), (40, 2000), (300, 2000), (2000, 300), (480, 640),
         (333, 1001), (1536, 1536), (768, 2304), (2304, 700), (100, 600), (17, 3)]


def random_sizes(count, seed=0, high=4000):
  rng = np.random.default_rng(seed)
  return [tuple(int(x) for x in s) for s in np.exp(rng.uniform(0, np.log(high), (count, 2)))]


def hf_self(pinpoints, tile, patch):
  """Stands in for the model in transformers' pack_image_features (it reads only config)."""
  vision = types.SimpleNamespace(image_size=tile, patch_size=patch)
  return types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=vision, image_grid_pinpoints=[list(p) for p in pinpoints]))


def check_pack(pinpoints, tile, patch, sizes, max_num_patches=None, dim=5, seed=0):
  """Packs random features of each size both ways; returns how many were downscaled."""
  rng = np.random.default_rng(seed)
  n = tile // patch
  max_tiles = data_anyres.max_grid_tiles(pinpoints, tile)
  max_len = anyres.max_image_tokens(pinpoints, tile, patch, max_num_patches)
  me = hf_self(pinpoints, tile, patch)
  downscaled = 0
  for size in sizes:
    rows, cols = data_anyres.grid_shape(size, pinpoints, tile)
    feats = rng.standard_normal((1 + rows * cols, n * n, dim)).astype(np.float32)
    newline = rng.standard_normal(dim).astype(np.float32)
    args = ([torch.tensor(feats)], torch.tensor([size]))
    if max_num_patches is None:
      want, lens = modeling_llava_next.LlavaNextModel.pack_image_features(
          me, *args, 'default', torch.tensor(newline))
    else:
      want, lens = modeling_llava_onevision.LlavaOnevisionModel.pack_image_features(
          me, *args, torch.tensor(newline), vision_aspect_ratio=f'anyres_max_{max_num_patches}')
    want = want[0].numpy()
    table = anyres.pack_table(size, pinpoints, tile, patch, max_len, max_num_patches)
    padded = np.zeros((max_tiles + 1, n * n, dim), np.float32)
    padded[:len(feats)] = feats
    got = np.asarray(anyres.pack(padded, table.index, table.weight, table.newline, newline))
    assert table.length == len(want) == int(lens[0]), size
    assert table.length == anyres.num_image_tokens(size, pinpoints, tile, patch, max_num_patches)
    np.testing.assert_allclose(got[:table.length], want, atol=1e-6, rtol=0, err_msg=str(size))
    assert not np.any(got[table.length:])
    box = anyres.unpad_box(size, (rows, cols), n)
    downscaled += anyres.downscaled_shape(box[2], box[3], n, max_num_patches) != box[2:]
  return downscaled


@pytest.mark.parametrize('pinpoints,tile,patch', [(NEXT, 336, 14), (TINY_NEXT, 56, 14)])
def test_pack_equals_llava_next(pinpoints, tile, patch):
  check_pack(pinpoints, tile, patch, FIXED + random_sizes(40))


@pytest.mark.parametrize('pinpoints,tile,patch,budget', [(ONEVISION, 384, 14, 9),
                                                         (TINY_ONEVISION, 28, 7, 9),
                                                         (TINY_ONEVISION, 28, 7, 2)])
def test_pack_equals_onevision(pinpoints, tile, patch, budget):
  downscaled = check_pack(pinpoints, tile, patch, FIXED + random_sizes(40, seed=1),
                          max_num_patches=budget)
  assert downscaled >= 5  # The bilinear path is exercised.


def test_untiled_image_gets_one_newline():
  # OneVision's multi-image samples: one tile, then image_newline (transformers' else branch).
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((1, 16, 3)).astype(np.float32)
  newline = rng.standard_normal(3).astype(np.float32)
  want, _ = modeling_llava_onevision.LlavaOnevisionModel.pack_image_features(
      hf_self(TINY_ONEVISION, 28, 7), [torch.tensor(feats)], torch.tensor([[30, 20]]),
      torch.tensor(newline))
  table = anyres.pack_table((30, 20), TINY_ONEVISION, 28, 7, 40, 9, tiled=False)
  padded = np.zeros((37, 16, 3), np.float32)
  padded[:1] = feats
  got = np.asarray(anyres.pack(padded, *table[:3], newline))
  assert table.length == 17 == len(want[0])
  np.testing.assert_allclose(got[:17], want[0].numpy(), atol=1e-6, rtol=0)


def test_pack_compiles_once_for_all_sizes():
  traces = []

  def fn(features, index, weight, newline, image_newline):
    traces.append(1)
    return jax.vmap(anyres.pack, in_axes=(0, 0, 0, 0, None))(
        features, index, weight, newline, image_newline)

  jitted = jax.jit(fn)
  max_len = anyres.max_image_tokens(TINY_ONEVISION, 28, 7, 2)
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((2, 37, 16, 4)).astype(np.float32)
  newline = rng.standard_normal(4).astype(np.float32)
  for sizes in [((30, 20), (500, 90)), ((1, 1), (2000, 300)), ((333, 1001), (64, 64))]:
    tables = [anyres.pack_table(s, TINY_ONEVISION, 28, 7, max_len, 2) for s in sizes]
    stacked = [np.stack([t[i] for t in tables]) for i in range(3)]
    got = jitted(feats, *stacked, newline)
    for b, t in enumerate(tables):
      np.testing.assert_allclose(
          got[b], anyres.pack(feats[b], t.index, t.weight, t.newline, newline), atol=1e-6)
  assert len(traces) == 1


def tiny_tokenizer():
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<unk>': 0, '<image>': 1, 'hi': 2},
                                                         unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token='<unk>', additional_special_tokens=['<image>'])


def next_image_processor():
  cls = getattr(transformers, 'LlavaNextImageProcessorPil', transformers.LlavaNextImageProcessor)
  return cls(size={'shortest_edge': 336}, crop_size={'height': 336, 'width': 336},
             image_grid_pinpoints=[list(p) for p in NEXT])


def test_num_image_tokens_equals_llava_next_processor():
  processor = transformers.LlavaNextProcessor(
      image_processor=next_image_processor(), tokenizer=tiny_tokenizer(), patch_size=14,
      vision_feature_select_strategy='default', num_additional_image_tokens=1)
  for h, w in [(336, 336), (7, 5), (300, 2000), (2000, 300), (100, 600), (333, 1001)]:
    out = processor(images=Image.new('RGB', (w, h)), text='<image> hi', return_tensors='np')
    assert (out['input_ids'] == 1).sum() == anyres.num_image_tokens((h, w), NEXT, 336, 14)
  # The processor's own count (what it inserts) on many more sizes, without pixels.
  for h, w in FIXED + random_sizes(500, seed=2):
    want = processor._get_number_of_features(h, w, 336, 336) - 1  # pylint: disable=protected-access
    assert anyres.num_image_tokens((h, w), NEXT, 336, 14) == want, (h, w)


def test_num_image_tokens_equals_onevision_processor():
  cls = transformers.LlavaOnevisionProcessor
  # Built without __init__: its video processor needs torchvision, which lvm does not install.
  processor = cls.__new__(cls)
  cls_ip = getattr(transformers, 'LlavaOnevisionImageProcessorPil',
                   transformers.LlavaOnevisionImageProcessor)
  processor.image_processor = cls_ip(size={'height': 384, 'width': 384},
                                     image_grid_pinpoints=[list(p) for p in ONEVISION])
  processor.num_image_tokens, processor.image_token = 729, '<image>'
  processor.vision_feature_select_strategy, processor.vision_aspect_ratio = 'full', 'anyres_max_9'
  images = [[Image.new('RGB', (2304, 768))], [Image.new('RGB', (20, 30)), Image.new('RGB', (9, 4))]]
  inputs = processor.image_processor(images, return_tensors='np')
  for i, tiled in enumerate([True, False, False]):
    want = len(processor.replace_image_token(inputs, i)) // len('<image>')
    got = anyres.num_image_tokens(inputs['image_sizes'][i], ONEVISION, 384, 14, 9, tiled=tiled)
    assert got == want
  for h, w in FIXED + random_sizes(500, seed=3, high=8000):
    want = processor._get_number_of_features(h, w, 384, 384)  # pylint: disable=protected-access
    assert anyres.num_image_tokens((h, w), ONEVISION, 384, 14, 9) == want, (h, w)


def test_max_image_tokens_bounds_every_size():
  assert anyres.max_image_tokens(NEXT, 336, 14) == 576 + 48 * 48 + 48  # 2x2 grid, unpadded.
  for pinpoints, tile, budget in [(NEXT, 336, None), (ONEVISION, 384, 9)]:
    bound = anyres.max_image_tokens(pinpoints, tile, 14, budget)
    counts = [anyres.num_image_tokens(s, pinpoints, tile, 14, budget)
              for s in FIXED + random_sizes(2000, seed=4, high=10000)]
    assert max(counts) <= bound
    assert max(counts) > 0.9 * bound  # Not a loose bound.


def test_unpad_box_equals_unpad_image():
  for size in FIXED + random_sizes(300, seed=5):
    grid = data_anyres.grid_shape(size, NEXT, 336)
    ch, cw = grid[0] * 24, grid[1] * 24
    fmap = torch.arange(ch * cw).reshape(1, ch, cw)
    want = modeling_llava_next.unpad_image(fmap, torch.tensor(size))[0].numpy()
    top, left, rows, cols = anyres.unpad_box(size, grid, 24)
    np.testing.assert_array_equal(fmap[0, top:top + rows, left:left + cols].numpy(), want)


def test_bad_input():
  assert anyres.parse_vision_aspect_ratio('anyres_max_9') == 9
  assert anyres.parse_vision_aspect_ratio('anyres') is None
  with pytest.raises(ValueError, match='anyres_max_N'):
    anyres.parse_vision_aspect_ratio('anyres_max_')
  with pytest.raises(ValueError, match='more than the buffer of 100'):
    anyres.pack_table((300, 600), NEXT, 336, 14, 100)
  with pytest.raises(ValueError, match='patch size 400 does not fit'):
    anyres.num_image_tokens((300, 600), NEXT, 336, 400)
  with pytest.raises(ValueError, match='taps=4'):
    anyres.pack_table((768, 2304), ONEVISION, 384, 14, 9000, 9, taps=1)


@pytest.mark.parametrize('size', [(2304, 700), (300, 600), (1536, 1536)])
def test_pack_gradient_equals_torch(size):
  # Training back-propagates through the packing: d(sum(out * c))/d(features, newline).
  pinpoints, tile, patch, budget, dim = TINY_ONEVISION, 28, 7, 2, 3
  rng = np.random.default_rng(0)
  rows, cols = data_anyres.grid_shape(size, pinpoints, tile)
  feats = rng.standard_normal((1 + rows * cols, 16, dim)).astype(np.float32)
  newline = rng.standard_normal(dim).astype(np.float32)
  max_len = anyres.max_image_tokens(pinpoints, tile, patch, budget)
  table = anyres.pack_table(size, pinpoints, tile, patch, max_len, budget)
  coef = rng.standard_normal((max_len, dim)).astype(np.float32)
  f, nl = torch.tensor(feats, requires_grad=True), torch.tensor(newline, requires_grad=True)
  want, _ = modeling_llava_onevision.LlavaOnevisionModel.pack_image_features(
      hf_self(pinpoints, tile, patch), [f], torch.tensor([size]), nl,
      vision_aspect_ratio=f'anyres_max_{budget}')
  (want[0] * torch.tensor(coef[:table.length])).sum().backward()

  def loss(x, n):
    return (anyres.pack(x, table.index, table.weight, table.newline, n) * coef).sum()

  got_f, got_nl = jax.grad(loss, argnums=(0, 1))(feats, newline)
  np.testing.assert_allclose(got_f, f.grad.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_nl, nl.grad.numpy(), atol=1e-5, rtol=0)


def test_stream_index_concatenates_images_without_padding():
  rng = np.random.default_rng(0)
  lengths = np.array([[3, 0, 5], [0, 0, 0], [6, 6, 1], [2, 6, 0]], np.int32)
  max_len, size = 6, 16
  packed = rng.standard_normal((4, 3, max_len, 2)).astype(np.float32)
  for b in range(4):
    for n in range(3):
      packed[b, n, lengths[b, n]:] = 0  # What pack gives past each length.
  index = np.asarray(jax.jit(anyres.stream_index, static_argnums=(1, 2))(
      lengths, max_len, size))
  assert index.shape == (4, size) and index.dtype == np.int32
  for b in range(4):
    want = np.concatenate([packed[b, n, :lengths[b, n]] for n in range(3)])
    got = packed[b].reshape(3 * max_len, 2)[index[b]]
    np.testing.assert_array_equal(got[:len(want)], want)
    assert np.all((0 <= index[b]) & (index[b] < 3 * max_len))
