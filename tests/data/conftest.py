"""Shared fixtures: a tiny prepared `shapes` dataset, small test tokenizers, and helpers to
read and compare training batches."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny


def tiny_shapes_config(data_dir, **data):
  """configs/tiny.py with a small shapes dataset in `data_dir`; `data`: config.data overrides,
  dotted keys into sub-groups (`**{'shapes.vocab_size': 510}`)."""
  config = tiny.get_config()
  config.data.data_dir = str(data_dir)
  config.data.shapes.train = 96
  config.data.shapes.validation = 24
  config.data.shapes.test = 24
  config.data.prefetch = 0
  for key, value in data.items():
    *groups, last = key.split('.')
    node = config.data
    for g in groups:
      node = node[g]
    node[last] = value
  return config


def make_iterator(data_dir, state=None, num_epochs=None, **data):
  """The training-split iterator of `tiny_shapes_config(data_dir, **data)`, resumed at `state`
  (an iterator state) when given."""
  from lvm import sharding  # pylint: disable=g-import-not-at-top
  from lvm.data import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(data_dir, **data)
  it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh),
                              num_epochs=num_epochs)
  if state is not None:
    it.set_state(state)
  return it


def take_batches(it, n=None):
  """The next `n` batches of `it` (all that are left when None) as host numpy arrays."""
  out = []
  for batch in it:
    out.append(jax.tree.map(np.asarray, batch))
    if len(out) == n:
      break
  return out


def assert_same_batches(a, b):
  """Two lists of batches are equal, key by key, to the bit."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
  """A data_dir holding the tiny shapes dataset, prepared once per test process."""
  from lvm import data  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('shapes_data')
  data.prepare(tiny_shapes_config(d))
  return d


# A word-level tokenizer.json: specials first, then every word the golden conversations use.
SPECIALS = ['[UNK]', '<s>', '</s>', '<|begin_of_text|>', '<|start_header_id|>',
            '<|end_header_id|>', '<|eot_id|>']
WORDS = ('A chat between a curious user and an artificial intelligence assistant . The gives '
         "helpful , detailed polite answers to the ' s questions USER : ASSISTANT What color is "
         'circle ? red How many shapes are there two Describe image blue square system '
         'You language vision able understand visual content that provides assist with '
         'variety of tasks using natural').split()


def word_tokenizer(tmp_path, specials=True):
  """Writes a WordLevel tokenizer.json (+ tokenizer_config.json) and returns its path."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = list(dict.fromkeys(WORDS))
  specials_list = SPECIALS if specials else SPECIALS[:3]
  vocab = {t: i for i, t in enumerate(specials_list + words)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix='##')
  tok.add_special_tokens(specials_list[1:])
  d = tmp_path / ('wl' if specials else 'wl_nospecial')
  os.makedirs(d, exist_ok=True)
  tok.save(str(d / 'tokenizer.json'))
  with open(d / 'tokenizer_config.json', 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>'}, f)
  return str(d / 'tokenizer.json')


SP_CORPUS = ('What color is the circle?', 'red', 'How many shapes are there?', 'two',
             'USER: ASSISTANT:', 'A blue square.', 'Describe the image.')


def sp_tokenizer(tmp_path):
  """Trains a tiny SentencePiece BPE model (unk 0, bos 1, eos 2) and returns its path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  prefix = str(tmp_path / 'sp')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(SP_CORPUS) * 20), model_prefix=prefix, vocab_size=60,
      model_type='bpe', character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      user_defined_symbols=['\n'], normalization_rule_name='identity',
      remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return prefix + '.model'
