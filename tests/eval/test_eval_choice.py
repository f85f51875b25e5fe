"""GQA exact match and ScienceQA letter parsing, on fixtures in the official layout."""

import json

import pytest

from lvm.eval import gqa, scienceqa


def test_gqa_fixture_scores(tmp_path):
  (tmp_path / 'testdev_balanced_questions.json').write_text(json.dumps({
      'q1': {'imageId': 'n1', 'question': 'Is the cup red?', 'answer': 'yes',
             'types': {'structural': 'verify'}},
      'q2': {'imageId': 'n2', 'question': 'Which side is the cat on?', 'answer': 'left',
             'types': {'structural': 'query'}},
      'q3': {'imageId': 'n2', 'question': 'Where is the dog?', 'answer': 'left',
             'types': {'structural': 'query'}},
  }))
  examples = gqa.load(str(tmp_path))
  assert examples[0].image == str(tmp_path / 'images' / 'n1.jpg')
  assert examples[1].prompt.endswith('\nAnswer the question using a single word or phrase.')
  scores = gqa.score(examples, {'q1': 'Yes.', 'q2': 'Left', 'q3': 'on the left'})
  assert scores['accuracy'] == pytest.approx(200 / 3)
  assert scores['accuracy_by_structural_type'] == {'query': 50.0, 'verify': 100.0}


@pytest.mark.parametrize('text, letter', [
    ('B', 'B'), (' B\n', 'B'), ('B. a cat', 'B'), ('The answer is C.', 'C'),
    ('I think B', None), ('b', None), ('The answer is A. The answer is B.', None), ('', None),
])
def test_scienceqa_parse_letter(text, letter):
  assert scienceqa.parse_letter(text) == letter


def test_scienceqa_fixture_scores(tmp_path):
  problems = {
      '1': {'question': 'Which is a mammal?', 'choices': ['frog', 'dog', 'fish'], 'answer': 1,
            'hint': '', 'image': 'image.png', 'split': 'test'},
      '2': {'question': 'Which is hot?', 'choices': ['ice', 'fire'], 'answer': 1,
            'hint': 'Look at the picture.', 'image': 'image.png', 'split': 'test'},
      '3': {'question': 'No image here', 'choices': ['a', 'b'], 'answer': 0, 'hint': '',
            'image': None, 'split': 'test'},
      '4': {'question': 'Pick one', 'choices': ['x', 'y', 'z'], 'answer': 2, 'hint': '',
            'image': 'image.png', 'split': 'test'},
      '5': {'question': 'Pick again', 'choices': ['x', 'y'], 'answer': 0, 'hint': '',
            'image': 'image.png', 'split': 'test'},
      '6': {'question': 'Train only', 'choices': ['x', 'y'], 'answer': 0, 'hint': '',
            'image': 'image.png', 'split': 'train'},
  }
  (tmp_path / 'problems.json').write_text(json.dumps(problems))
  (tmp_path / 'pid_splits.json').write_text(json.dumps({'test': ['1', '2', '3', '4', '5'],
                                                        'train': ['6']}))
  examples = scienceqa.load(str(tmp_path))
  assert [e.question_id for e in examples] == ['1', '2', '4', '5']  # IMG subset of test
  assert examples[0].prompt == ("Which is a mammal?\nA. frog\nB. dog\nC. fish\n"
                                "Answer with the option's letter from the given choices directly.")
  assert examples[1].prompt.startswith('Context: Look at the picture.\nWhich is hot?\nA. ice\n')
  assert examples[0].image == str(tmp_path / 'images' / 'test' / '1' / 'image.png')
  # 1 right, 2 right (parsed from "B. fire"), 4 unparseable, 5 letter C out of range (2 choices).
  scores = scienceqa.score(examples, {'1': 'B', '2': 'B. fire', '4': 'z', '5': 'C'})
  assert scores['accuracy'] == pytest.approx(50.0)
  assert scores['unparseable'] == 2
