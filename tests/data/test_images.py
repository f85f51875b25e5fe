"""Image decoding, conversion and CLIPImageProcessor parity."""

import io

import numpy as np
from PIL import Image
import pytest

from lvm import config as lvm_config
from lvm.data import images


def encode(im, fmt='PNG', **kw):
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def random_image(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize('size,aspect', [((500, 375), 'pad'), ((200, 333), 'resize'),
                                         ((30, 50), 'pad'), ((336, 336), 'resize')])
def test_matches_clip_image_processor(size, aspect):
  transformers = pytest.importorskip('transformers')
  processor_cls = getattr(transformers, 'CLIPImageProcessorPil', None) or (
      transformers.CLIPImageProcessor)
  mean, std = lvm_config.CLIP_MEAN, lvm_config.CLIP_STD
  processor = processor_cls(
      do_resize=True, size={'shortest_edge': 336}, resample=3, do_center_crop=True,
      crop_size={'height': 336, 'width': 336}, do_rescale=True, rescale_factor=1 / 255,
      do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
  im = random_image(*size)
  # LLaVA-1.5: expand2square with the mean colour, then the processor.
  src = images.expand2square(im, tuple(int(x * 255) for x in mean)) if aspect == 'pad' else im
  want = processor(src, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  got = images.preprocess(im, 336, aspect, mean, std)
  assert got.shape == (336, 336, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_pad_fills_with_mean_colour():
  im = Image.new('RGB', (40, 20), (255, 0, 0))
  out = images.preprocess(im, 40, 'pad', lvm_config.CLIP_MEAN, lvm_config.CLIP_STD)
  background = (np.array(images.mean_colour(lvm_config.CLIP_MEAN)) / 255 - lvm_config.CLIP_MEAN) / (
      np.array(lvm_config.CLIP_STD))
  np.testing.assert_allclose(out[0, 0], background, atol=1e-5)
  np.testing.assert_allclose(out[20, 20], (np.array([1, 0, 0]) - lvm_config.CLIP_MEAN) /
                             np.array(lvm_config.CLIP_STD), atol=1e-5)
  siglip = images.preprocess(Image.new('RGB', (8, 8), (255, 255, 255)), 8, 'resize',
                             lvm_config.SIGLIP_MEAN, lvm_config.SIGLIP_STD)
  np.testing.assert_allclose(siglip, 1.0, atol=1e-6)


@pytest.mark.parametrize('mode,note', [('L', 'converted_l'), ('RGBA', 'converted_rgba'),
                                       ('CMYK', 'converted_cmyk'), ('P', 'converted_p'),
                                       ('LA', 'converted_la'), ('I;16', 'converted_i16')])
def test_modes_convert_to_rgb(mode, note):
  base = random_image(16, 12)
  if mode == 'I;16':
    im = Image.fromarray((np.arange(16 * 12).reshape(12, 16) * 300).astype(np.uint16))
  else:
    im = base.convert(mode)
  fmt = 'JPEG' if mode == 'CMYK' else 'PNG'
  out, notes = images.decode(encode(im, fmt))
  assert out.mode == 'RGB' and out.size == (16, 12)
  assert notes == [note]
  if mode == 'L':
    a = np.asarray(out)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_transparent_pixels_become_white():
  im = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
  im.putpixel((0, 0), (10, 20, 30, 255))
  out, _ = images.decode(encode(im))
  assert out.getpixel((1, 1)) == (255, 255, 255)
  assert out.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty_image'),
    (b'not an image at all', 'corrupt_image'),
    (encode(random_image(64, 64), 'JPEG')[:3000], 'truncated_image'),
])
def test_bad_bytes(data, reason):
  with pytest.raises(images.ImageError) as e:
    images.decode(data)
  assert e.value.reason == reason


def test_decompression_bomb_is_rejected_before_decoding():
  # A 1-bit 9000x8000 PNG is a few KB on disk and 72M pixels once decoded.
  data = encode(Image.new('1', (9000, 8000)))
  assert len(data) < 100_000
  with pytest.raises(images.ImageError) as e:
    images.decode(data)
  assert e.value.reason == 'image_too_large'
  with pytest.raises(images.ImageError):
    images.decode(encode(Image.new('L', (300, 300))), max_pixels=300 * 299)


def test_load_is_decode_plus_preprocess():
  im = random_image(50, 30)
  data = encode(im)
  np.testing.assert_array_equal(
      images.load(data, 32, 'pad', lvm_config.CLIP_MEAN, lvm_config.CLIP_STD),
      images.preprocess(im, 32, 'pad', lvm_config.CLIP_MEAN, lvm_config.CLIP_STD))
  with pytest.raises(ValueError, match='image_aspect'):
    images.preprocess(im, 32, 'squash', lvm_config.CLIP_MEAN, lvm_config.CLIP_STD)
