"""MMMU's parsing rules, VizWiz, TextVQA (LLaVA's OCR prompt), LLaVA-Bench on fixtures."""

import json
import random

import pytest
from PIL import Image

from configs import tiny
from lvm import evaluate
from lvm.eval import mmmu, textvqa, vizwiz
from lvm.eval.base import Issues
from lvm.generate import Output

ABCD = ['A', 'B', 'C', 'D']
INDEX2ANS = {'A': 'apple pie', 'B': 'banana', 'C': 'cherry', 'D': 'date'}


@pytest.mark.parametrize('response, expected', [
    ('(B)', 'B'),
    ('The answer is B.', 'B'),  # ' B ' after the trailing period is stripped
    ('I choose (A), no wait, (C)', 'C'),  # several: the last one
    ('I would definitely say that banana is right', 'B'),  # > 5 words: option text
    ('B or D', 'D'),  # two letters: the later one
])
def test_mmmu_parse_multi_choice(response, expected):
  assert mmmu.parse_multi_choice(response, ABCD, INDEX2ANS, random.Random(0)) == (expected, True)


def test_mmmu_parse_multi_choice_falls_back_to_seeded_random():
  guess = random.Random(42).choice(ABCD)
  assert mmmu.parse_multi_choice('no idea', ABCD, INDEX2ANS, random.Random(42)) == (guess, False)


def test_mmmu_parse_open_and_eval_open():
  # 'is ' and 'answer ' both match; the shortest tail wins; numbers round to 2 decimals.
  assert mmmu.parse_open('The answer is 3.14159.') == [3.14]
  assert mmmu.eval_open('3.14', mmmu.parse_open('The answer is 3.14159.'))
  assert not mmmu.eval_open('3.15', [3.14])
  assert mmmu.parse_open('It is Paris') == ['paris']
  assert mmmu.eval_open('Paris', ['paris'])
  assert mmmu.eval_open(['24/7', '1,000'], mmmu.parse_open('so the total = 1000'))
  assert mmmu.normalize_str('x') == [' x', 'x ']  # one letter: no trivial substring match


def test_mmmu_fixture_scores(tmp_path):
  rows = [
      {'id': 'validation_Art_Theory_1', 'question': '<image 1> Which fruit?',
       'options': "['apple pie', 'banana']", 'answer': 'B',
       'question_type': 'multiple-choice', 'image_1': 'a.png'},
      {'id': 'validation_Math_2', 'question': 'What is pi?', 'options': '[]',
       'answer': '3.14', 'question_type': 'open', 'image_1': 'b.png'},
      {'id': 'validation_Math_3', 'question': 'Broken', 'options': '[unclosed',
       'answer': 'A', 'question_type': 'multiple-choice'},
  ]
  (tmp_path / 'mmmu_validation.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  issues = Issues()
  examples = mmmu.load(str(tmp_path), issues=issues)
  assert issues.counts == {'malformed_question': 1}
  assert examples[0].prompt == ("<image 1> Which fruit?\n\n(A) apple pie\n(B) banana\n\n\n"
                                "Answer with the option's letter from the given choices "
                                'directly.')
  assert examples[1].prompt == ('What is pi?\n\nAnswer the question using a single word or '
                                'phrase.')
  assert examples[0].image == str(tmp_path / 'a.png')
  scores = mmmu.score(examples, {'validation_Art_Theory_1': '(B)',
                                 'validation_Math_2': 'It is about 3.14159'})
  assert scores['accuracy'] == 100.0 and scores['unparseable'] == 0
  assert scores['accuracy_by_subject'] == {'Art_Theory': 100.0, 'Math': 100.0}
  scores = mmmu.score(examples, {'validation_Art_Theory_1': 'hmm',
                                 'validation_Math_2': '3'})
  assert scores['unparseable'] == 1 and scores['accuracy_by_type']['open'] == 0.0


def test_vizwiz_val_fixture(tmp_path):
  (tmp_path / 'Annotations').mkdir()
  ann = lambda image, q, answers, kind: {
      'image': image, 'question': q, 'answers': [{'answer': a, 'answer_confidence': 'yes'}
                                                 for a in answers],
      'answer_type': kind, 'answerable': int(kind != 'unanswerable')}
  (tmp_path / 'Annotations' / 'val.json').write_text(json.dumps([
      ann('v0.jpg', 'What is this?', ['unanswerable'] * 2 + ['blue'] * 8, 'unanswerable'),
      ann('v1.jpg', 'What color?', ['red'] * 10, 'other'),
      ann('v2.jpg', 'Which can?', ['soup'] * 10, 'other'),
  ]))
  examples = vizwiz.load(str(tmp_path))
  assert examples[0].prompt == ("What is this?\nWhen the provided information is "
                                "insufficient, respond with 'Unanswerable'.\nAnswer the "
                                'question using a single word or phrase.')
  assert examples[0].image == str(tmp_path / 'val' / 'v0.jpg')
  # 'Unanswerable.' matches 2 humans: leave-one-out mean (2 x 1/3 + 8 x 2/3) / 10 = 0.6.
  scores = vizwiz.score(examples, {'v0.jpg': 'Unanswerable.', 'v1.jpg': 'Red'})
  assert scores['accuracy'] == pytest.approx(100 * (0.6 + 1 + 0) / 3)
  assert scores['accuracy_by_answer_type'] == pytest.approx({'other': 50.0,
                                                             'unanswerable': 60.0})
  assert scores['predicted_unanswerable'] == pytest.approx(100 / 3)


def test_textvqa_uses_llava_question_file_verbatim(tmp_path):
  (tmp_path / 'TextVQA_0.5.1_val.json').write_text(json.dumps({'data': [
      {'question_id': 34602, 'image_id': 'img1', 'question': 'what is the brand?',
       'answers': ['nike'] * 10, 'ocr_tokens': ['NIKE', 'air']},
      {'question_id': 34603, 'image_id': 'img2', 'question': 'what year?',
       'answers': ['1999'] * 10, 'ocr_tokens': []},
  ]}))
  llava = [
      {'question_id': 'img1', 'image': 'img1.jpg',
       'text': 'What is the brand?\nReference OCR token: Nike, Air\nAnswer the question '
               'using a single word or phrase.'},
      {'question_id': 'img2', 'image': 'img2.jpg',
       'text': 'what year?\nAnswer the question using a single word or phrase.'},
      {'question_id': 'img9', 'image': 'img9.jpg', 'text': 'unknown?\nAnswer briefly.'},
  ]
  (tmp_path / textvqa.LLAVA_QUESTIONS).write_text(''.join(json.dumps(r) + '\n' for r in llava))
  issues = Issues()
  examples = textvqa.load(str(tmp_path), issues=issues)
  assert [(e.question_id, e.prompt) for e in examples] == [(34602, llava[0]['text']),
                                                           (34603, llava[1]['text'])]
  assert issues.counts == {'malformed_question': 1}  # no annotation for img9
  assert textvqa.question_of(llava[0]['text']) == 'what is the brand?'
  # Without the question file, the prompt is built from the annotations' OCR tokens.
  (tmp_path / textvqa.LLAVA_QUESTIONS).unlink()
  built = textvqa.load(str(tmp_path))
  assert built[0].prompt == ('what is the brand?\nReference OCR token: NIKE, air\nAnswer the '
                             'question using a single word or phrase.')
  assert built[1].prompt == 'what year?\nAnswer the question using a single word or phrase.'
  no_ocr = textvqa.load(str(tmp_path), ocr=False)
  assert 'Reference OCR token' not in no_ocr[0].prompt
  assert textvqa.score(built, {34602: 'Nike', 34603: '2000'})['accuracy'] == 50.0


class _Echo:
  def answer(self, conversations, images, max_new_tokens, sampling, min_batch=1):
    assert max_new_tokens == 1024  # LLaVA's model_vqa.py budget
    return [Output([], 'stop', 'About ' + c[-1]['value'].split('\n')[1]) for c in conversations]


def test_llava_bench_writes_review_answers_in_question_order(tmp_path):
  qs = [{'question_id': i, 'image': f'{i}.jpg', 'text': f'Describe {i}.', 'category': 'conv'}
        for i in range(3)]
  (tmp_path / 'questions.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in qs)
                                            + '{broken\n')
  (tmp_path / 'images').mkdir()
  for i in (0, 2):  # 1.jpg is missing
    Image.new('RGB', (16, 16)).save(tmp_path / 'images' / f'{i}.jpg')
  out = tmp_path / 'out'
  result = evaluate.run(_Echo(), tiny.get_config(), 'llava_bench', str(tmp_path), str(out))
  assert (result['num_questions'], result['num_scored'], result['num_for_submission']) == (
      4, 0, 2)
  assert result['skipped'] == {'malformed_line': 1, 'missing_image': 1}
  lines = [json.loads(l) for l in (out / 'llava_bench_answers.jsonl').read_text().splitlines()]
  assert [(l['question_id'], l['text']) for l in lines] == [
      (0, 'About Describe 0.'), (1, ''), (2, 'About Describe 2.')]
  assert set(lines[0]) == {'question_id', 'prompt', 'text', 'answer_id', 'model_id',
                           'metadata'}


class _ByQuestion:
  def __init__(self, script):
    self.script = script

  def answer(self, conversations, images, max_new_tokens, sampling, min_batch=1):
    return [Output([], 'stop', self.script[c[-1]['value'].split('\n')[1]]) for c in conversations]


def test_mmmu_test_split_writes_evalai_dict(tmp_path):
  rows = [
      {'id': 'test_Math_1', 'question': 'Pick one', 'options': "['1', '2', '3']",
       'answer': '?', 'question_type': 'multiple-choice', 'image_1': 'a.png'},
      {'id': 'test_Math_2', 'question': 'How many?', 'options': '[]', 'answer': '?',
       'question_type': 'open', 'image_1': 'a.png'},
  ]
  (tmp_path / 'mmmu_test.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  Image.new('RGB', (16, 16)).save(tmp_path / 'a.png')
  out = tmp_path / 'out'
  result = evaluate.run(_ByQuestion({'Pick one': 'It must be (C).', 'How many?': 'about 7'}),
                        tiny.get_config(), 'mmmu', str(tmp_path), str(out), split='test')
  assert (result['num_scored'], result['num_for_submission']) == (0, 2)
  assert json.loads((out / 'mmmu_test_submission.json').read_text()) == {
      'test_Math_1': 'C', 'test_Math_2': 'about 7'}
