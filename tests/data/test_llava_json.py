"""llava_json: a LLaVA-format folder with every kind of broken input prepares and counts."""

import io
import json

import jax
import numpy as np
from PIL import Image
import pytest

from lvm import data, sharding
from lvm.data import llava_json, pipeline
from tests.data.conftest import tiny_shapes_config, word_tokenizer


def _png(im, fmt='PNG'):
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


def rgb(w=40, h=30, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def conv(q, a, *more):
  turns = [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
  for k, v in enumerate(more):
    turns.append({'from': 'human' if k % 2 == 0 else 'gpt', 'value': v})
  return turns


def write_fixture(root):
  """A manual dir with one file of each problem; returns the expected report."""
  img = root / 'images'
  (img / 'coco').mkdir(parents=True)
  files = {
      'good.jpg': _png(rgb(), 'JPEG'),
      'coco/0001.jpg': _png(rgb(64, 48, 1), 'JPEG'),
      'grey.png': _png(rgb().convert('L')),
      'rgba.png': _png(rgb().convert('RGBA')),
      'cmyk.jpg': _png(rgb().convert('CMYK'), 'JPEG'),
      'palette.png': _png(rgb().convert('P')),
      'really_png.jpg': _png(rgb()),
      'corrupt.jpg': b'\xff\xd8\xff\xe0 this is not a jpeg',
      'truncated.jpg': _png(rgb(200, 200, 2), 'JPEG')[:2000],
      'huge.png': _png(Image.new('1', (9000, 8000))),
  }
  for name, b in files.items():
    (img / name).write_bytes(b)
  describe = '<image>\nRender a clear and concise summary of the photo.'
  samples = [
      # LCS-558K layout: image, one caption.
      {'id': 'lcs', 'image': 'good.jpg', 'conversations': conv(describe, 'a photo of noise')},
      # mix665k layout: multi-turn, the image marker after the question, a dataset subfolder.
      {'id': 'mix', 'image': 'coco/0001.jpg',
       'conversations': conv('What color is the circle?\n<image>', 'red',
                             'How many shapes are there?', 'two')},
      {'id': 'text_only', 'conversations': conv('How many shapes are there?', 'two')},
      {'id': 'grey', 'image': 'grey.png', 'conversations': conv(describe, 'grey')},
      {'id': 'rgba', 'image': 'rgba.png', 'conversations': conv(describe, 'rgba')},
      {'id': 'cmyk', 'image': 'cmyk.jpg', 'conversations': conv(describe, 'cmyk')},
      {'id': 'palette', 'image': 'palette.png', 'conversations': conv(describe, 'palette')},
      {'id': 'wrong_ext', 'image': 'really_png.jpg', 'conversations': conv(describe, 'png')},
      {'id': 'two_images', 'image': ['good.jpg', 'grey.png'],
       'conversations': conv('<image> and <image>: which is grey?', 'the second')},
      {'id': 'long', 'image': 'good.jpg',
       'conversations': conv('<image>\n' + 'What color is the circle? ' * 40, 'red')},
      {'id': 'missing', 'image': 'nope.jpg', 'conversations': conv(describe, 'x')},
      {'id': 'corrupt', 'image': 'corrupt.jpg', 'conversations': conv(describe, 'x')},
      {'id': 'truncated', 'image': 'truncated.jpg', 'conversations': conv(describe, 'x')},
      {'id': 'huge', 'image': 'huge.png', 'conversations': conv(describe, 'x')},
      {'id': 'markers_many', 'image': 'good.jpg',
       'conversations': conv('<image> <image> twice', 'x')},
      {'id': 'markers_few', 'image': 'good.jpg', 'conversations': conv('no marker', 'x')},
      {'id': 'empty', 'image': 'good.jpg', 'conversations': conv(describe, '  ')},
      {'id': 'roles', 'conversations': [{'from': 'human', 'value': 'a'},
                                        {'from': 'human', 'value': 'b'}]},
      {'id': 'no_convs', 'image': 'good.jpg'},
  ]
  (root / 'llava_mix.json').write_text(json.dumps(samples))
  return {
      'kept': 10, 'text_only': 1,
      'skipped': {'bad_record': 1, 'bad_roles': 1, 'corrupt_image': 1, 'empty_answer': 1,
                  'image_too_large': 1, 'missing_image': 1, 'too_few_image_markers': 1,
                  'too_many_image_markers': 1, 'truncated_image': 1},
      'fixed': {'converted_cmyk': 1, 'converted_l': 2, 'converted_p': 1, 'converted_rgba': 1,
                'wrong_extension': 1},
  }


@pytest.fixture(scope='module')
def llava_config(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava')
  expected = write_fixture(root / 'manual')
  config = tiny_shapes_config(root / 'tfds', dataset='llava_json',
                              manual_dir=str(root / 'manual'),
                              **{'llava_json.validation_fraction': 0.0},
                              tokenizer=word_tokenizer(root))
  config.data.seq_len = 64
  return config, expected


def test_prepare_counts_every_problem(llava_config):
  config, expected = llava_config
  data.prepare(config)
  report = llava_json.load_report(config)
  for k, v in expected.items():
    assert report[k] == v, k
  assert any('huge' in e for e in report['examples']['image_too_large'])
  assert pipeline.num_examples(config, 'train') == 10
  data.prepare(config)  # idempotent


def test_pipeline_over_llava_json(llava_config):
  config, _ = llava_config
  data.prepare(config)
  mesh = sharding.make_mesh(config.mesh)
  it = pipeline.make_iterator(config, 'train', mesh, shuffle=False, num_epochs=1)
  rows = []
  for batch in it:
    b = jax.tree.map(np.asarray, batch)
    rows += [i for i in range(8) if b['attention_mask'][i].any()]
    assert (b['loss_mask'] <= b['attention_mask']).all()
    for i in range(8):
      if b['attention_mask'][i].any():
        n_img = int((b['input_ids'][i] == 510).sum())
        assert n_img in (0, 16)
        if n_img == 0:  # text only: its image slot is zeros
          assert not b['images'][i].any()
        else:
          assert b['images'][i].any()
  # 10 kept: the 2-image sample exceeds data.max_images=1, and the long question leaves no
  # room for its answer within seq_len=64.
  assert len(rows) == 8
  assert it.stats == {'too_many_images': 1, 'no_supervised_tokens_after_truncation': 1}


def test_validation_split_by_id_hash():
  ids = [f'sample-{i}' for i in range(2000)]
  frac = np.mean([llava_json.split_of(i, 0.1) == 'validation' for i in ids])
  assert 0.07 < frac < 0.13
  assert llava_json.split_of('x', 0.0) == 'train'
