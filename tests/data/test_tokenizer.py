"""The tokenizer interface over SentencePiece and tokenizer.json."""

import pytest

from lvm.data import tokenizer as tokenizer_lib
from lvm.data.tokenizer import Tokenizer
from tests.data.conftest import sp_tokenizer, tiny_shapes_config, word_tokenizer


@pytest.mark.parametrize('kind', ['sentencepiece', 'tokenizer.json'])
def test_interface(tmp_path, kind):
  path = sp_tokenizer(tmp_path) if kind == 'sentencepiece' else word_tokenizer(tmp_path)
  tok = Tokenizer(path, 100, 101)
  assert (tok.bos_id, tok.eos_id, tok.image_token_id, tok.pad_id) == (1, 2, 100, 101)
  ids = tok.encode('What color is the circle?')
  assert ids and tok.bos_id not in ids and tok.eos_id not in ids  # nothing added
  assert tok.encode('What color is the circle?', add_bos=True) == [1] + ids
  text = tok.decode([1] + ids + [100, 100, 2, 101, 101])
  assert text.startswith('<s>') and text.endswith('<image><image></s>')
  assert 'color' in text and 'circle' in text
  assert tok.token_to_id('</s>') == 2
  assert tok.token_to_id('<|not a token|>') is None


def test_ids_must_not_collide(tmp_path):
  with pytest.raises(ValueError, match='image_token_id=5 collides'):
    Tokenizer(word_tokenizer(tmp_path), 5, 101)


def test_load_errors(tmp_path):
  config = tiny_shapes_config(tmp_path, dataset='llava_json')
  with pytest.raises(ValueError, match='config.data.tokenizer is empty'):
    tokenizer_lib.load(config)
  config.data.tokenizer = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tokenizer_lib.load(config)
  config = tiny_shapes_config(tmp_path / 'unprepared')
  with pytest.raises(FileNotFoundError, match='lvm.data.prepare'):
    tokenizer_lib.load(config)
