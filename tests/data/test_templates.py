"""Golden ids and masks for every template, mismatch detection, and truncation."""

import numpy as np
import pytest

from lvm import registry
from lvm.data import templates
from lvm.data.tokenizer import Tokenizer
from tests.data.conftest import sp_tokenizer, word_tokenizer

IMG, PAD = 100, 101
SHIPPED = ('plain', 'vicuna_v1', 'llama3')
TURNS = [{'from': 'human', 'value': 'What color is the circle?\n<image>'},
         {'from': 'gpt', 'value': 'red'},
         {'from': 'human', 'value': 'How many shapes are there?'},
         {'from': 'gpt', 'value': 'two'}]

# Word-level ids (tests/data/conftest.py): <s> 1, </s> 2, <|begin_of_text|> 3,
# <|start_header_id|> 4, <|end_header_id|> 5, <|eot_id|> 6, USER 31, : 32, ASSISTANT 33,
# What 34, color 35, is 36, the 27, circle 37, ? 38, red 39, How 40, many 41, shapes 42,
# are 43, there 44, two 45, system 50, user 12, assistant 17.
VICUNA_SYSTEM_IDS = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 17, 20, 21, 22, 23, 22, 13,
                     24, 25, 26, 27, 12, 28, 29, 30, 18]
LLAMA3_SYSTEM_IDS = [51, 43, 10, 21, 52, 13, 53, 17, 18, 51, 43, 54, 26, 55, 27, 56, 57, 58, 27,
                     12, 59, 22, 13, 60, 27, 12, 61, 10, 62, 63, 64, 65, 66, 52, 18]

GOLDEN_WORD = {
    # <s> <image x3> red \n two \n: questions dropped, every answer supervised (the
    # word-level pre-tokenizer drops the newlines).
    'plain': ([1, IMG, IMG, IMG, 39, 45],
              [0, 0, 0, 0, 1, 1]),
    # <s> SYS USER : <image x3> What color is the circle ? ASSISTANT : red </s>
    #     USER : How many shapes are there ? ASSISTANT : two </s>
    'vicuna_v1': ([1] + VICUNA_SYSTEM_IDS + [31, 32, IMG, IMG, IMG, 34, 35, 36, 27, 37, 38, 33,
                                             32, 39, 2, 31, 32, 40, 41, 42, 43, 44, 38, 33, 32,
                                             45, 2],
                  [0] * 30 + [0] * 13 + [1, 1] + [0] * 10 + [1, 1]),
    # <|begin_of_text|> <sh> system <eh> SYS <eot> <sh> user <eh> <image x3> What ... ? <eot>
    #   <sh> assistant <eh> red <eot> <sh> user <eh> How ... ? <eot> <sh> assistant <eh> two <eot>
    'llama3': ([3, 4, 50, 5] + LLAMA3_SYSTEM_IDS + [6, 4, 12, 5, IMG, IMG, IMG, 34, 35, 36, 27,
                                                    37, 38, 6, 4, 17, 5, 39, 6, 4, 12, 5, 40, 41,
                                                    42, 43, 44, 38, 6, 4, 17, 5, 45, 6]),
}
GOLDEN_WORD['llama3'] = (GOLDEN_WORD['llama3'],
                         [0] * 56 + [1, 1] + [0] * 13 + [1, 1])


@pytest.fixture(scope='module')
def word_tok(tmp_path_factory):
  return Tokenizer(word_tokenizer(tmp_path_factory.mktemp('tok')), IMG, PAD)


@pytest.fixture(scope='module')
def sp_tok(tmp_path_factory):
  return Tokenizer(sp_tokenizer(tmp_path_factory.mktemp('sp')), IMG, PAD)


@pytest.mark.parametrize('template', SHIPPED)
def test_golden_word_level(word_tok, template):
  ids, mask = templates.render(template, TURNS, word_tok, 3)
  want_ids, want_mask = GOLDEN_WORD[template]
  assert ids.tolist() == want_ids
  assert mask.astype(int).tolist() == want_mask
  assert ids.dtype == np.int32 and mask.dtype == bool


@pytest.mark.parametrize('template', SHIPPED)
def test_supervised_is_answers_and_end_of_turn(word_tok, template):
  ids, mask = templates.render(template, TURNS, word_tok, 3)
  end = {'plain': '', 'vicuna_v1': '</s>', 'llama3': '<|eot_id|>'}[template]
  text = word_tok.decode(ids[mask])
  if template == 'plain':  # plain: the answers and their newlines.
    assert text.split() == ['red', 'two']
  else:
    assert text.replace(end, ' ').split() == ['red', 'two']
    assert text.count(end) == 2
  bos = word_tok.token_to_id('<|begin_of_text|>') if template == 'llama3' else word_tok.bos_id
  assert ids[0] == bos and int((ids == bos).sum()) == 1  # BOS once, never supervised.
  assert not mask[0]
  assert not mask[ids == IMG].any()


def test_golden_sentencepiece_plain(sp_tok):
  turns = [{'from': 'human', 'value': '<image>\nDescribe the image.'},
           {'from': 'gpt', 'value': 'red'}]
  ids, mask = templates.render('plain', turns, sp_tok, 2)
  # <s> <image x2> ▁ re d \n: the caption and its newline are supervised.
  assert ids.tolist() == [1, IMG, IMG, 25, 4, 54, 3]
  assert mask.astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_golden_sentencepiece_vicuna_last_round(sp_tok):
  ids, mask = templates.render('vicuna_v1', TURNS, sp_tok, 2)
  # ... </s> ▁ US ER : ▁ Ho w ▁ ma n y ▁s ha p es ▁ are ▁the re ? ▁A SS IS T AN T : ▁t w o </s>
  tail = [2, 25, 21, 17, 39, 25, 18, 45, 25, 10, 56, 59, 14, 9, 57, 8, 25, 15, 7, 4, 40, 11, 20,
          19, 41, 16, 41, 39, 5, 45, 35, 2]
  assert ids[-len(tail):].tolist() == tail
  # Supervised: '▁ re d </s>' of round 1 and '▁t w o </s>' of round 2, nothing else.
  first = len(ids) - len(tail) - 3
  assert np.flatnonzero(mask).tolist() == [first, first + 1, first + 2, first + 3] + list(
      range(len(ids) - 4, len(ids)))
  assert sp_tok.decode(ids[mask]) == 'red</s>two</s>'
  assert ids[0] == 1 and int((ids == 1).sum()) == 1


def test_shipped_templates_are_registered_and_unknown_names_fail():
  assert set(SHIPPED) <= set(registry.TEMPLATE.names())
  with pytest.raises(ValueError, match=r"config.data.template='vicuna' is not a registered "
                                       r"template; registered: \['chatml', 'gemma', 'llama3', "
                                       r"'mistral', 'plain', 'vicuna_v1'"):
    templates.stop_strings('vicuna')


def test_render_prompt_is_prefix_of_training_ids(word_tok):
  for template in SHIPPED:
    ids, mask = templates.render(template, TURNS, word_tok, 3)
    prompt = templates.render_prompt(template, TURNS[:3], word_tok, 3)
    first_answer_end = np.flatnonzero(mask)[1] + 1  # answer 'red' and its end token
    if template == 'plain':
      first_answer_end = np.flatnonzero(mask)[0] + 1
    assert ids[:len(prompt)].tolist() == prompt.tolist()
    assert len(prompt) >= first_answer_end  # It holds the whole first round.
    assert mask[len(prompt)]  # The next token is where the answer starts.
    if template != 'plain':  # (plain has no prompt text: the last caption ends the prefix.)
      assert not mask[len(prompt) - 1]


class MergingTokenizer:
  """Characters as ids, except ': ' is one token: the chunk boundary 'ASSISTANT:' | ' A' then
  changes the prompt's last token, which must be detected."""
  bos_id, eos_id, image_token_id, pad_id = 1, 2, IMG, PAD

  def encode(self, text, add_bos=False):
    out, i = [], 0
    while i < len(text):
      if text.startswith(': ', i):
        out.append(3)
        i += 2
      else:
        out.append(10 + ord(text[i]) % 80)
        i += 1
    return [self.bos_id] + out if add_bos else out

  def token_to_id(self, token):
    return None


def test_tokenization_mismatch_is_rejected():
  with pytest.raises(templates.SampleError) as e:
    templates.render('vicuna_v1', TURNS, MergingTokenizer(), 3)
  assert e.value.reason == 'tokenization_mismatch'
  # The plain template has no such boundary: it renders.
  ids, mask = templates.render('plain', TURNS, MergingTokenizer(), 3)
  assert mask.sum() == len('red\n') + len('two\n')


@pytest.mark.parametrize('turns,reason', [
    ([{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': '  '}], 'empty_answer'),
    ([{'from': 'human', 'value': 'Q'}, {'from': 'human', 'value': 'Q'}], 'bad_roles'),
    ([{'from': 'human', 'value': 'Q'}], 'no_answer'),
    ([{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': '<image> A'}],
     'image_marker_in_answer'),
])
def test_bad_conversations(word_tok, turns, reason):
  with pytest.raises(templates.SampleError) as e:
    templates.render('vicuna_v1', turns, word_tok, 3)
  assert e.value.reason == reason


def test_llama3_needs_its_special_tokens(tmp_path):
  tok = Tokenizer(word_tokenizer(tmp_path, specials=False), IMG, PAD)
  with pytest.raises(ValueError, match='<|begin_of_text|>'):
    templates.render('llama3', TURNS, tok, 3)


def test_truncation_cuts_text_only(word_tok):
  ids, mask = templates.render('vicuna_v1', TURNS, word_tok, 3)
  n = len(ids)
  for seq_len in (n, n - 1, n - 5, 45):
    t_ids, t_mask = templates.encode_example('vicuna_v1', TURNS, word_tok, 3, seq_len, 1)
    assert t_ids.tolist() == ids[:seq_len].tolist()
    assert t_mask.tolist() == mask[:seq_len].tolist()
  # 43 = up to the first answer: no supervised token is left.
  with pytest.raises(templates.SampleError) as e:
    templates.encode_example('vicuna_v1', TURNS, word_tok, 3, 43, 1)
  assert e.value.reason == 'no_supervised_tokens_after_truncation'
  # The image tokens end at index 34: a shorter sequence cannot hold them.
  with pytest.raises(templates.SampleError) as e:
    templates.encode_example('vicuna_v1', TURNS, word_tok, 3, 34, 1)
  assert e.value.reason == 'image_tokens_do_not_fit'


def test_image_count_mismatch(word_tok):
  with pytest.raises(templates.SampleError) as e:
    templates.encode_example('vicuna_v1', TURNS, word_tok, 3, 100, num_images=0)
  assert e.value.reason == 'image_count_mismatch'


def test_lone_image_marker_moves_to_front():
  turns = templates.normalize_turns(TURNS)
  assert turns[0]['value'] == '<image>\nWhat color is the circle?'
  assert templates.stop_strings('vicuna_v1') == ('</s>',)


def test_system_prompt_override(word_tok):
  """None keeps the template's system prompt, '' drops it, other text replaces it; the
  prompt and the mask of everything after it are unchanged."""
  ids, mask = templates.render('vicuna_v1', TURNS, word_tok, 3)
  want_ids, want_mask = GOLDEN_WORD['vicuna_v1']
  none_ids, none_mask = templates.render('vicuna_v1', TURNS, word_tok, 3, system='')
  assert none_ids.tolist() == [1] + want_ids[1 + len(VICUNA_SYSTEM_IDS):]
  assert none_mask.tolist() == [0] + want_mask[1 + len(VICUNA_SYSTEM_IDS):]
  own_ids, _ = templates.render('vicuna_v1', TURNS, word_tok, 3, system='the circle is red')
  assert own_ids.tolist()[:6] == [1, 27, 37, 36, 39, 31]  # <s> the circle is red USER
  l3_ids, l3_mask = templates.render('llama3', TURNS, word_tok, 3, system='')
  assert l3_ids.tolist() == [3] + GOLDEN_WORD['llama3'][0][4 + len(LLAMA3_SYSTEM_IDS) + 1:]
  assert l3_mask.tolist() == [0] + GOLDEN_WORD['llama3'][1][4 + len(LLAMA3_SYSTEM_IDS) + 1:]
  prompt = templates.render_prompt('vicuna_v1', TURNS[:1], word_tok, 3, system='')
  assert prompt.tolist() == none_ids.tolist()[:len(prompt)]
