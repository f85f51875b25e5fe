"""MMBench (circular, MMBench's matching), SEED-Bench (image) on hand-computed fixtures."""

import base64
import io
import json

import pytest
from PIL import Image

from lvm.eval import mmbench, seed

OPTS = {'A': 'cat', 'B': 'dog'}


@pytest.mark.parametrize('answer, expected', [
    ('B', 'B'),
    ('B. dog', 'B'),
    ('The answer is B', 'B'),
    ('(A)', 'A'),
    ('A dog sits here', 'B'),  # a lone "A" in >3 words is an article; then the text matches
    ('cat', 'A'),  # option text
    ('It is a Dog.', 'B'),
    ('a cat or a dog', None),  # two option texts: unparseable
    ('A or B', None),  # two letters
    ('Cannot determine the answer', 'Z'),  # refusal
    ('', None),
])
def test_mmbench_match(answer, expected):
  assert mmbench.match(answer, OPTS) == expected


def _png_b64():
  buf = io.BytesIO()
  Image.new('RGB', (8, 8), (0, 0, 255)).save(buf, format='PNG')
  return base64.b64encode(buf.getvalue()).decode()


def _tsv(path, rows):
  cols = ['index', 'question', 'hint', 'A', 'B', 'C', 'D', 'answer', 'category', 'image']
  path.write_text('\n'.join(['\t'.join(cols)] + ['\t'.join(str(r.get(c, '')) for c in cols)
                                                   for r in rows]) + '\n')


def test_mmbench_circular_fixture(tmp_path):
  image = _png_b64()
  _tsv(tmp_path / 'mmbench_dev_20230712.tsv', [
      {'index': 100, 'question': 'What animal?', 'hint': 'A farm.', 'A': 'cow', 'B': 'pig',
       'C': 'hen', 'D': 'nan', 'answer': 'B', 'category': 'recognition', 'image': image},
      {'index': 101, 'question': 'Is it day?', 'hint': 'nan', 'A': 'yes', 'B': 'no',
       'answer': 'A', 'category': 'reasoning', 'image': '100'},  # shares row 100's image
      {'index': 102, 'question': 'Bad?', 'A': 'x', 'B': 'y', 'answer': 'D',
       'category': 'reasoning', 'image': image},  # answer not among its options
  ])
  from lvm.eval.base import Issues  # pylint: disable=g-import-not-at-top
  issues = Issues()
  examples = mmbench.load(str(tmp_path), issues=issues)
  assert issues.counts == {'malformed_question': 1}
  assert [e.question_id for e in examples] == ['100/0', '100/1', '100/2', '101/0', '101/1']
  assert examples[1].prompt == ('A farm.\nWhat animal?\nA. pig\nB. hen\nC. cow\n'
                                "Answer with the option's letter from the given choices "
                                'directly.')
  assert examples[3].prompt.startswith('Is it day?\nA. yes\nB. no\n')  # no hint
  assert examples[3].image == examples[0].image == base64.b64decode(image)
  # 100: right in every round (B, then pig shown as A, then pig shown as C) -> counts.
  # 101: right in round 0, but round 1 shows "no" as A and the answer is A -> wrong.
  preds = {'100/0': 'B', '100/1': 'A. pig', '100/2': 'pig', '101/0': 'A',
           '101/1': 'A'}
  scores = mmbench.score(examples, preds)
  assert scores['accuracy'] == 50.0 and scores['accuracy_round0'] == 100.0
  assert scores['num_questions'] == 2 and scores['num_rounds'] == 5
  assert scores['accuracy_by_category'] == {'reasoning': 0.0, 'recognition': 100.0}
  scores = mmbench.score(examples, dict(preds, **{'100/2': 'pig or hen'}))
  assert scores['accuracy'] == 0.0 and scores['unparseable'] == 1
  assert scores['unparseable_examples'] == ["100/2: 'pig or hen'"]


def test_seed_image_fixture(tmp_path):
  q = lambda i, t, ans, kind='image': {
      'question_id': str(i), 'question': f'Q{i}?', 'choice_a': 'a', 'choice_b': 'b',
      'choice_c': 'c', 'choice_d': 'd', 'answer': ans, 'data_id': f'{i}.jpg',
      'data_type': kind, 'question_type_id': t}
  (tmp_path / 'SEED-Bench.json').write_text(json.dumps({
      'questions': [q(1, 1, 'B'), q(2, 1, 'B'), q(3, 2, 'A'), q(4, 10, 'A', 'video'),
                    q(5, 2, 'E')],
      'question_type': {'Scene Understanding': 1, 'Instance Identity': 2,
                        'Action Recognition': 10}}))
  from lvm.eval.base import Issues  # pylint: disable=g-import-not-at-top
  issues = Issues()
  examples = seed.load(str(tmp_path), issues=issues)
  assert [e.question_id for e in examples] == ['1', '2', '3']  # video left out
  assert issues.counts == {'malformed_question': 1}  # answer E
  assert examples[0].prompt == ("Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's "
                                'letter from the given choices directly.')
  assert examples[0].image == str(tmp_path / 'SEED-Bench-image' / '1.jpg')
  # LLaVA's rule: the stripped answer must be the letter itself ('B.' is wrong).
  scores = seed.score(examples, {'1': ' B', '2': 'B.', '3': 'C'})
  assert scores['accuracy'] == pytest.approx(100 / 3)
  assert scores['accuracy_by_type'] == {'Instance Identity': 0.0,
                                        'Scene Understanding': 50.0}
  assert scores['unparseable'] == 1

