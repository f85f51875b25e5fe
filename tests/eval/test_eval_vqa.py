"""VQAv2 / TextVQA normalization and soft accuracy, on fixtures in the official layout."""

import json

import pytest

from lvm.eval import textvqa, vqa


@pytest.mark.parametrize('raw, expected', [
    ('Two dogs.', '2 dogs'),  # number words, final period
    ('The cat', 'cat'),  # articles
    ('an apple', 'apple'),
    ('isnt', "isn't"),  # contractions restored
    ('dont know', "don't know"),
    ('1,000', '1000'),  # thousands separator
    ('3.5', '3.5'),  # a period inside a number stays
    ('black-and-white', 'black and white'),  # a hyphen between letters becomes a space
    ('yes!', 'yes'),
    ('Yes, it is', 'yes it is'),
    ('none', '0'),
    ("man's hat", "man 's hat"),
    ('  Red\n', 'red'),
])
def test_normalize(raw, expected):
  assert vqa.normalize(raw) == expected


def test_leave_one_out_accuracy_hand_computed():
  # k humans agree: leaving one of them out leaves k-1, leaving another out leaves k.
  assert vqa.leave_one_out_accuracy('yes', ['yes'] * 1 + ['no'] * 9) == pytest.approx(0.3)
  assert vqa.leave_one_out_accuracy('yes', ['yes'] * 2 + ['no'] * 8) == pytest.approx(0.6)
  assert vqa.leave_one_out_accuracy('yes', ['yes'] * 3 + ['no'] * 7) == pytest.approx(0.9)
  assert vqa.leave_one_out_accuracy('yes', ['yes'] * 4 + ['no'] * 6) == pytest.approx(1.0)
  assert vqa.leave_one_out_accuracy('maybe', ['yes'] * 10) == 0.0
  with pytest.raises(ValueError):
    vqa.leave_one_out_accuracy('yes', [])


def test_vqav2_accuracy_official_quirks():
  assert vqa.vqav2_accuracy('Two', ['2'] * 10) == 1.0  # the prediction is normalized
  # Disagreeing humans get punctuation processing: 'black-and-white' == 'black and white'.
  humans = ['black-and-white'] * 3 + ['gray'] * 7
  assert vqa.vqav2_accuracy('Black and white.', humans) == pytest.approx(0.9)
  # Unanimous humans are compared raw (the official evaluator only cleans on disagreement).
  assert vqa.vqav2_accuracy('black and white', ['black-and-white'] * 10) == 0.0
  assert vqa.textvqa_accuracy('black and white', ['black-and-white'] * 10) == 1.0


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_vqav2_fixture_scores(tmp_path):
  _write(tmp_path / 'v2_OpenEnded_mscoco_val2014_questions.json', {'questions': [
      {'question_id': 1, 'image_id': 42, 'question': 'How many dogs?'},
      {'question_id': 2, 'image_id': 42, 'question': 'Is it sunny?'},
      {'question_id': 3, 'image_id': 7, 'question': 'What color is the car?'},
      {'question_id': 4, 'image_id': 7, 'question': 'Unannotated?'},
  ]})
  ann = lambda qid, answers: {'question_id': qid, 'answers': [{'answer': a} for a in answers]}
  _write(tmp_path / 'v2_mscoco_val2014_annotations.json', {'annotations': [
      ann(1, ['2'] * 10), ann(2, ['yes'] * 3 + ['no'] * 7), ann(3, ['red'] * 10)]})
  examples = vqa.load_vqav2(str(tmp_path))
  # 4 has no annotation: asked, but for submission only (not scored).
  assert [(e.question_id, e.answered) for e in examples] == [
      (1, True), (2, True), (3, True), (4, False)]
  examples = examples[:3]
  assert examples[0].prompt == 'How many dogs?\nAnswer the question using a single word or phrase.'
  assert examples[0].image == str(tmp_path / 'val2014' / 'COCO_val2014_000000000042.jpg')
  scores = vqa.score_vqav2(examples, {1: 'two', 2: 'Yes.'})  # 3 unanswered: 0
  assert scores['accuracy'] == pytest.approx(100 * (1 + 0.9 + 0) / 3)


def test_textvqa_fixture_scores(tmp_path):
  _write(tmp_path / 'TextVQA_0.5.1_val.json', {'data': [
      {'question_id': 10, 'image_id': 'abc', 'question': 'what brand?',
       'answers': ['Nike'] * 2 + ['nike.'] * 2 + ['adidas'] * 6, 'ocr_tokens': ['nike', 'air']},
      {'question_id': 11, 'image_id': 'def', 'question': 'what drink?',
       'answers': ['coca cola'] + ['coke'] * 9},
  ]})
  examples = textvqa.load(str(tmp_path))
  assert examples[0].prompt == ('what brand?\nReference OCR token: nike, air\n'
                                'Answer the question using a single word or phrase.')
  assert examples[1].image == str(tmp_path / 'train_images' / 'def.jpg')
  # 'NIKE' matches 4 normalized humans -> 1.0; 'Coca-Cola' -> 'coca cola' matches 1 -> 0.3.
  scores = textvqa.score(examples, {10: 'NIKE', 11: 'Coca-Cola'})
  assert scores['accuracy'] == pytest.approx(65.0)
