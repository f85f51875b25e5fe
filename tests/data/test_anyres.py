"""anyres preprocessing: pixel parity with transformers' LLaVA-NeXT and OneVision processors."""

import numpy as np
from PIL import Image
import pytest

from lvm.data import anyres

transformers = pytest.importorskip('transformers')

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# (height, width): square, 2:1, 1:2, 3:1 and 1:3 panoramas, 10:1 and beyond, tiny, huge.
SIZES = [(336, 336), (1, 1), (7, 5), (5, 7), (300, 600), (600, 300), (224, 672), (672, 224),
         (100, 1000), (1000, 100), (40, 2000), (300, 2000), (2000, 300), (480, 640),
         (333, 1001), (1200, 1600), (17, 3)]


def _processor(name, **kw):
  """The PIL-backend class (what AutoImageProcessor picks without torchvision)."""
  cls = getattr(transformers, name + 'Pil', None) or getattr(transformers, name)
  return cls(**kw)


def next_processor(resample=3):
  return _processor(
      'LlavaNextImageProcessor', size={'shortest_edge': 336},
      crop_size={'height': 336, 'width': 336}, resample=resample, image_mean=list(CLIP_MEAN),
      image_std=list(CLIP_STD), image_grid_pinpoints=[list(p) for p in
                                                      anyres.LLAVA_NEXT_PINPOINTS])


def onevision_processor(mean=SIGLIP_MEAN, std=SIGLIP_STD):
  return _processor(
      'LlavaOnevisionImageProcessor', size={'height': 384, 'width': 384}, resample=3,
      image_mean=list(mean), image_std=list(std),
      image_grid_pinpoints=[list(p) for p in anyres.onevision_pinpoints()])


def random_image(h, w, seed=0):
  rng = np.random.default_rng(seed + 7 * h + w)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def nhwc(pixel_values):
  return np.asarray(pixel_values)[0].transpose(0, 2, 3, 1)


@pytest.mark.parametrize('size', SIZES)
def test_llava_next_pixels_equal_transformers(size):
  im = random_image(*size)
  want = nhwc(next_processor()(im, return_tensors='np')['pixel_values'])
  got = anyres.tiles(im, anyres.LLAVA_NEXT_PINPOINTS, 336, CLIP_MEAN, CLIP_STD)
  rows, cols = anyres.grid_shape(size, anyres.LLAVA_NEXT_PINPOINTS, 336)
  assert got.shape == want.shape == (1 + rows * cols, 336, 336, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize('size', SIZES + [(384, 384), (768, 2304), (3000, 2000)])
def test_onevision_pixels_equal_transformers(size):
  im = random_image(*size)
  want = nhwc(onevision_processor()(im, return_tensors='np')['pixel_values'])
  got = anyres.tiles(im, anyres.onevision_pinpoints(), 384, SIGLIP_MEAN, SIGLIP_STD)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_onevision_multi_image_pads_to_square_with_mean_colour():
  # Several images in one sample: one tile each, padded with the processor's mean colour.
  ims = [random_image(100, 300), random_image(250, 40), random_image(64, 64)]
  processor = onevision_processor(CLIP_MEAN, CLIP_STD)
  out = processor([ims], return_tensors='np')
  assert list(out['batch_num_images']) == [3]
  for i, im in enumerate(ims):
    want = np.asarray(out['pixel_values'])[i, :1].transpose(0, 2, 3, 1)
    got = anyres.square_tile(im, 384, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert not np.any(np.asarray(out['pixel_values'])[i, 1:])  # Batch padding only.


def test_resample_filter_is_honoured():
  im = random_image(300, 700)
  bilinear = Image.Resampling.BILINEAR
  want = nhwc(next_processor(resample=2)(im, return_tensors='np')['pixel_values'])
  got = anyres.tiles(im, anyres.LLAVA_NEXT_PINPOINTS, 336, CLIP_MEAN, CLIP_STD, bilinear)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  bicubic = anyres.tiles(im, anyres.LLAVA_NEXT_PINPOINTS, 336, CLIP_MEAN, CLIP_STD)
  assert np.abs(bicubic - want).max() > 1e-3  # The filter matters.


def test_base_tile_is_squashed_and_padding_is_black():
  im = Image.new('RGB', (600, 100), (255, 255, 255))  # 6:1: padded above and below.
  t = anyres.tiles(im, anyres.LLAVA_NEXT_PINPOINTS, 336, SIGLIP_MEAN, SIGLIP_STD)
  np.testing.assert_array_equal(t[0], 1.0)  # Whole image stretched to the tile: all white.
  # 1x2 tiles keep all pixels (effective resolution capped at the original) with less waste.
  assert anyres.select_best_resolution((100, 600), anyres.LLAVA_NEXT_PINPOINTS) == (336, 672)
  nh, nw = anyres.fit_size((100, 600), (336, 672))
  assert (nh, nw) == (113, 672)  # ceil(100 * (672 / 600)) = ceil(112.00000000000001).
  top = (336 - nh) // 2
  np.testing.assert_array_equal(t[1, :top], -1.0)  # Black (0) padding, not the mean colour.
  np.testing.assert_array_equal(t[1, top:top + nh], 1.0)
  np.testing.assert_array_equal(t[1, top + nh:], -1.0)


def test_select_best_resolution_equals_transformers():
  select_best_resolution = transformers.image_processing_utils.select_best_resolution
  rng = np.random.default_rng(0)
  sizes = [tuple(s) for s in rng.integers(1, 3000, (400, 2))] + SIZES
  for pins in (anyres.LLAVA_NEXT_PINPOINTS, anyres.onevision_pinpoints()):
    plist = [list(p) for p in pins]
    for s in sizes:
      assert anyres.select_best_resolution(s, pins) == tuple(select_best_resolution(s, plist))


def test_pad_tiles():
  t = anyres.tiles(random_image(50, 900), anyres.LLAVA_NEXT_PINPOINTS, 336, CLIP_MEAN, CLIP_STD)
  max_tiles = anyres.max_grid_tiles(anyres.LLAVA_NEXT_PINPOINTS, 336)
  assert max_tiles == 4 and anyres.max_grid_tiles(anyres.onevision_pinpoints(), 384) == 36
  padded, count = anyres.pad_tiles(t, max_tiles)
  assert padded.shape == (5, 336, 336, 3) and count == t.shape[0] == 4
  np.testing.assert_array_equal(padded[:count], t)
  assert not np.any(padded[count:])
  with pytest.raises(ValueError, match='exceed the configured maximum of 2'):
    anyres.pad_tiles(t, 2)


def test_bad_grids_and_images():
  with pytest.raises(ValueError, match='multiples of the tower size 336'):
    anyres.tiles(random_image(10, 10), [(336, 600)], 336, CLIP_MEAN, CLIP_STD)
  with pytest.raises(ValueError, match='empty'):
    anyres.check_pinpoints([], 336)
  with pytest.raises(ValueError, match='must be positive'):
    anyres.select_best_resolution((0, 5), anyres.LLAVA_NEXT_PINPOINTS)
  with pytest.raises(ValueError, match='RGB'):
    anyres.tiles(Image.new('L', (5, 5)), anyres.LLAVA_NEXT_PINPOINTS, 336, CLIP_MEAN, CLIP_STD)
