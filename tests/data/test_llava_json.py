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


# --- Splits, broken files, images outside the folder, changed images (issue 27) ----------

def _small_folder(root, n=6, test=2):
  """A manual dir: `train.json` (n samples), `held_out.json` (test samples), images/."""
  (root / 'images').mkdir(parents=True)
  describe = '<image>\nDescribe image'
  for i in range(n + test):
    (root / 'images' / f'{i}.png').write_bytes(_png(rgb(seed=i)))
  train = [{'id': f's{i}', 'image': f'{i}.png', 'conversations': conv(describe, 'red')}
           for i in range(n)]
  held_out = [{'id': f't{i}', 'image': f'{i}.png', 'conversations': conv(describe, 'blue')}
              for i in range(n, n + test)]
  (root / 'train.json').write_text(json.dumps(train))
  (root / 'held_out.json').write_text(json.dumps(held_out))
  return train, held_out


def _config(tmp_path, **llava):
  return tiny_shapes_config(
      tmp_path / 'tfds', dataset='llava_json', manual_dir=str(tmp_path / 'manual'),
      tokenizer=word_tokenizer(tmp_path),
      **{'llava_json.validation_fraction': 0.0,
         **{f'llava_json.{k}': v for k, v in llava.items()}})


def _ids(config, split):
  return sorted(r['id'].decode() for r in pipeline.data_source(config, split))


def test_test_files_form_a_test_split_kept_out_of_train(tmp_path):
  _small_folder(tmp_path / 'manual')
  # A broken sample in the test file is counted like one in train.
  held = json.loads((tmp_path / 'manual' / 'held_out.json').read_text())
  held.append({'id': 'bad', 'image': 'nope.png', 'conversations': conv('<image> x', 'y')})
  (tmp_path / 'manual' / 'held_out.json').write_text(json.dumps(held))
  config = _config(tmp_path)
  assert llava_json.splits(config) == ['train']
  config = _config(tmp_path, test_files='held_out.json')
  assert llava_json.splits(config) == ['train', 'test']
  report = llava_json.prepare(config)
  # json_files='' takes every *.json but the test files.
  assert _ids(config, 'train') == [f's{i}' for i in range(6)]
  assert _ids(config, 'test') == ['t6', 't7']
  assert sorted(pipeline.splits(config)) == ['test', 'train']
  assert report['splits'] == {'train': {'kept': 6}, 'test': {'kept': 2, 'missing_image': 1}}
  assert report['skipped'] == {'missing_image': 1}


def test_a_test_file_also_trained_on_is_a_config_error():
  from lvm import validate  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config('/tmp', dataset='llava_json', manual_dir='/tmp',
                              **{'llava_json.json_files': 'a.json,b.json',
                                 'llava_json.test_files': 'b.json'})
  with pytest.raises(ValueError, match=r"config.data.llava_json.test_files: \['b.json'\] are "
                     'in json_files too'):
    validate.validate_config(config, 8)


def test_broken_json_file_is_fatal_naming_file_line_col(tmp_path):
  _small_folder(tmp_path / 'manual')
  # Line 3, column 12: the missing comma.
  (tmp_path / 'manual' / 'broken.json').write_text('[\n {"id": "a",\n  "image" "x.png"}\n]\n')
  config = _config(tmp_path)
  with pytest.raises(ValueError) as e:
    data.prepare(config)
  message = str(e.value)
  assert message.startswith(f'{tmp_path / "manual" / "broken.json"}:3:11: invalid JSON'), message
  assert 'skip_broken_files=True' in message


def test_broken_json_file_skipped_and_listed_when_asked(tmp_path):
  _small_folder(tmp_path / 'manual')
  (tmp_path / 'manual' / 'broken.json').write_text('[{"id": "a"')
  (tmp_path / 'manual' / 'not_a_list.json').write_text('{"id": "a"}')
  config = _config(tmp_path, skip_broken_files=True)
  report = llava_json.prepare(config)
  assert report['kept'] == 8  # train.json and held_out.json (no test_files here)
  assert report['broken_files'] == [str(tmp_path / 'manual' / 'broken.json'),
                                    str(tmp_path / 'manual' / 'not_a_list.json')]


def test_images_outside_the_folder_are_refused_unless_allowed(tmp_path):
  train, _ = _small_folder(tmp_path / 'manual')
  outside = tmp_path / 'outside.png'
  outside.write_bytes(_png(rgb(seed=9)))
  describe = '<image>\nDescribe image'
  train += [{'id': 'dotdot', 'image': '../outside.png', 'conversations': conv(describe, 'red')},
            {'id': 'abs', 'image': str(outside), 'conversations': conv(describe, 'red')},
            {'id': 'inner_dotdot', 'image': 'images/../images/0.png',
             'conversations': conv(describe, 'red')}]
  (tmp_path / 'manual' / 'train.json').write_text(json.dumps(train))
  config = _config(tmp_path, test_files='held_out.json')
  report = llava_json.prepare(config)
  assert report['splits']['train'] == {'kept': 7, 'image_outside_folder': 2}
  assert _ids(config, 'train') == sorted([f's{i}' for i in range(6)] + ['inner_dotdot'])
  assert any('../outside.png' in e for e in report['examples']['image_outside_folder'])
  config = _config(tmp_path, test_files='held_out.json', allow_outside_images=True)
  report = llava_json.prepare(config)
  assert report['splits']['train'] == {'kept': 9}


def test_changed_image_rebuilds_with_new_content_and_counts(tmp_path):
  _small_folder(tmp_path / 'manual')
  config = _config(tmp_path, test_files='held_out.json')
  report = llava_json.prepare(config)
  assert report['splits']['train'] == {'kept': 6}
  before = {r['id'].decode(): bytes(r['images'][0])
            for r in pipeline.data_source(config, 'train')}
  # Same names, other contents: one image replaced by a bigger one, one broken.
  new = _png(rgb(80, 60, seed=42))
  (tmp_path / 'manual' / 'images' / '0.png').write_bytes(new)
  (tmp_path / 'manual' / 'images' / '1.png').write_bytes(b'not a png')
  report = llava_json.prepare(config)
  assert report['splits']['train'] == {'kept': 5, 'corrupt_image': 1}
  after = {r['id'].decode(): bytes(r['images'][0])
           for r in pipeline.data_source(config, 'train')}
  assert before['s0'] != new and after['s0'] == new
  assert after['s2'] == before['s2'] and 's1' not in after
  # Unchanged images: the prepared dataset is reused as is.
  assert llava_json.prepare(config) == report
