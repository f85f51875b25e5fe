"""A dataset, a template and a benchmark registered here, in a test file, are picked up by the
config schema, config validation, the data pipeline and `lvm.evaluate` without any other
module knowing their names (issue 20, item 4)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from lvm import data, evaluate, registry, sharding, validate
from lvm.data import pipeline, templates
from lvm.data import tokenizer as tokenizer_lib
from lvm.eval import Benchmark, Example
from lvm.generate import Output
from tests.data.conftest import word_tokenizer

QUESTION = 'What color is the circle?'


def _png(colour):
  buf = io.BytesIO()
  Image.new('RGB', (20, 20), colour).save(buf, format='PNG')
  return buf.getvalue()


class ToyBuilder:
  """The TFDS-builder surface the pipeline uses: is_prepared, as_data_source, data_dir."""

  def __init__(self, config):
    self.size = config.data.toy.size
    self.data_dir = '/nowhere'

  def is_prepared(self):
    return True

  def as_data_source(self, split):
    assert split == 'train'
    answers = ('red', 'blue')
    return [{'id': f'toy-{i}'.encode(), 'images': [_png((200 * (i % 2), 0, 0))],
             'conversations': json.dumps([
                 {'from': 'human', 'value': '<image>\n' + QUESTION},
                 {'from': 'gpt', 'value': answers[i % 2]}]).encode(),
             'caption': b''} for i in range(self.size)]


class ToyDataset:
  """A dataset kind: records in memory, its own tokenizer, every call recorded."""

  def __init__(self, tokenizer_path):
    self.tokenizer_path = tokenizer_path
    self.calls = []

  def builder(self, config):
    self.calls.append('builder')
    return ToyBuilder(config)

  def prepare(self, config):
    self.calls.append(('prepare', config.data.toy.size))

  def own_tokenizer(self, config):
    self.calls.append('own_tokenizer')
    return self.tokenizer_path


def check_toy(config, problems):
  if config.data.toy.size < 1:
    problems.add('data.toy.size', f'must be >= 1, got {config.data.toy.size}', 'use 1 or more')


def toy_chunks(pairs, tokenizer, system):
  """`Q : question A : answer </s>`; the system prompt, when given, comes first."""
  c = [templates.Chunk('id', tokenizer.bos_id)]
  if system:
    c.append(templates.Chunk('text', system + ' '))
  for q, a in pairs:
    c += [templates.Chunk('image')] * q.count('<image>')
    c.append(templates.Chunk('text', 'USER : ' + q.replace('<image>', '').strip() + ' :'))
    if a is not None:
      c += [templates.Chunk('text', ' ' + a.strip(), True),
            templates.Chunk('id', tokenizer.eos_id, True)]
  return c


@pytest.fixture
def toy(tmp_path):
  dataset = ToyDataset(word_tokenizer(tmp_path))
  registry.DATASET.register('toy', dataset, defaults=lambda: {'size': 6}, check=check_toy)
  registry.TEMPLATE.register('toy_chat', templates.Template(toy_chunks, ('USER',)))
  yield dataset
  registry.DATASET.unregister('toy')
  registry.TEMPLATE.unregister('toy_chat')


def _toy_config():
  config = tiny.get_config()
  config.data.dataset = 'toy'
  config.data.template = 'toy_chat'
  config.data.tokenizer = ''
  config.data.seq_len = 32
  config.data.prefetch = 0
  config.model.image_token_id, config.model.pad_token_id = 510, 511
  return config


def test_registered_dataset_and_template_reach_the_schema_and_validation(toy):
  assert 'toy' in registry.DATASET.names() and 'toy_chat' in registry.TEMPLATE.names()
  config = _toy_config()
  assert config.data.toy.size == 6  # its defaults are a config group of their own
  validate.validate_config(config, 8)
  config.data.toy.size = 0
  with pytest.raises(ValueError) as info:
    validate.validate_config(config, 8)
  assert str(info.value).splitlines()[1:] == [
      '  - config.data.toy.size: must be >= 1, got 0. Fix: use 1 or more.']
  # The shipped datasets' groups are there too, and the toy one goes with its kind.
  assert 'shapes' in config.data and 'llava_json' in config.data
  registry.DATASET.unregister('toy')
  config = tiny.get_config()
  assert 'toy' not in config.data
  config.data.dataset = 'toy'
  with pytest.raises(ValueError, match=r"config.data.dataset: 'toy' is not a registered "
                                       r"dataset. Fix: use one of \['llava_json', 'shapes'\]"):
    validate.validate_config(config, 8)


def test_registered_dataset_and_template_reach_the_pipeline(toy):
  config = _toy_config()
  data.prepare(config)
  assert toy.calls == [('prepare', 6)]
  assert data.builder(config).size == 6
  tok = tokenizer_lib.load(config)
  assert 'own_tokenizer' in toy.calls and tok.path == toy.tokenizer_path
  mesh = sharding.make_mesh(config.mesh)
  it = pipeline.make_iterator(config, 'train', mesh, shuffle=False)
  batch = {k: np.asarray(v) for k, v in next(it).items()}
  it.close()
  # Row r holds record r: the toy template's tokens, 16 image tokens, the answer supervised.
  vocab = json.load(open(toy.tokenizer_path))['model']['vocab']
  words = lambda s: [vocab[w] for w in s.split()]
  for r, answer in enumerate(('red', 'blue', 'red', 'blue')):
    ids, mask = batch['input_ids'][r], batch['loss_mask'][r]
    want = ([tok.bos_id] + [510] * 16 + words('USER : What color is the circle ? :')
            + [vocab[answer], tok.eos_id])
    np.testing.assert_array_equal(ids[:len(want)], want)
    assert (ids[len(want):] == 511).all()
    np.testing.assert_array_equal(np.flatnonzero(mask), [len(want) - 2, len(want) - 1])
  # The images are the records' own: red (pad colour aside) in odd rows, black in even ones.
  assert batch['images'].shape == (8, 1, 32, 32, 3)
  centre = batch['images'][:, 0, 16, 16]
  assert centre[1, 0] > centre[0, 0] + 1
  assert templates.stop_strings('toy_chat') == ('USER',)


class Answerer:
  def __init__(self):
    self.calls = []

  def answer(self, conversations, images, max_new_tokens, sampling, min_batch=1):
    self.calls.append(max_new_tokens)
    return [Output([], 'stop', c[-1]['value'].split()[-1]) for c in conversations]


def test_registered_benchmark_reaches_evaluate(tmp_path):
  def load(data_dir, config, split=None, issues=None):
    del data_dir, config, split, issues
    return [Example(i, f'say {w}', None, {'answer': w}) for i, w in enumerate(('a', 'b', 'c'))]

  def score(examples, predictions, config):
    del config
    right = sum(predictions.get(e.question_id) == e.target['answer'] for e in examples)
    return {'right': right, 'of': len(examples)}

  registry.BENCHMARK.register('echo', Benchmark('echo', load, score,
                                                lambda s: ('right', s['right']), 7))
  try:
    result = evaluate.run(Answerer(), tiny.get_config(), 'echo', '', str(tmp_path), batch_size=2)
  finally:
    registry.BENCHMARK.unregister('echo')
  assert result['headline'] == {'right': 3} and result['scores'] == {'right': 3, 'of': 3}
  assert result['max_new_tokens'] == 7
  with pytest.raises(ValueError, match="Unknown benchmark 'echo'"):
    evaluate.run(Answerer(), tiny.get_config(), 'echo', '', str(tmp_path))
