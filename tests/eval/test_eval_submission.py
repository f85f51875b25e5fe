"""`--split`: questions without public answers are answered and written for submission."""

import json

import pytest
from PIL import Image

from configs import tiny
from lvm import evaluate
from lvm.generate import Output


class Answerer:
  """Stands in for TextGenerator: answers by the question (the line after `<image>`)."""

  def __init__(self, script):
    self.script = script

  def answer(self, conversations, images, max_new_tokens, sampling, min_batch=1):
    del images, max_new_tokens, sampling, min_batch
    return [Output([], 'stop', self.script.get(c[-1]['value'].split('\n')[1], ''))
            for c in conversations]


def _image(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', (24, 16), (200, 10, 10)).save(path)


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_vqav2_test_dev_writes_evalai_json_padded_to_test2015(tmp_path):
  qs = lambda ids: {'questions': [{'question_id': i, 'image_id': i, 'question': f'Q{i}?'}
                                  for i in ids]}
  _write(tmp_path / 'v2_OpenEnded_mscoco_test-dev2015_questions.json', qs([1, 2]))
  _write(tmp_path / 'v2_OpenEnded_mscoco_test2015_questions.json', qs([1, 2, 3]))
  for i in (1, 2):
    _image(tmp_path / 'test2015' / f'COCO_test2015_{i:012d}.jpg')
  out = tmp_path / 'out'
  result = evaluate.run(Answerer({'Q1?': 'Two dogs.', 'Q2?': 'The Cat'}), tiny.get_config(),
                        'vqav2', str(tmp_path), str(out), batch_size=2, split='test-dev2015')
  assert (result['num_questions'], result['num_scored'], result['num_for_submission']) == (
      2, 0, 2)
  assert result['headline'] == {} and result['scores'] == {}
  rows = json.loads((out / 'vqav2_test-dev2015_submission.json').read_text())
  # EvalAI-normalized answers; test2015 questions outside test-dev padded with '' (LLaVA).
  assert rows == [{'question_id': 1, 'answer': '2 dogs'}, {'question_id': 2, 'answer': 'cat'},
                  {'question_id': 3, 'answer': ''}]
  assert evaluate.too_few_scored(result, 0.5) is None
  assert 'no local answers to score  (0 of 2 questions scored, 0 skipped, 2 written for ' \
         'submission' in evaluate.summary(result)
  with pytest.raises(ValueError, match='no split'):
    evaluate.run(None, tiny.get_config(), 'vqav2', str(tmp_path), str(out), split='test-dev')


def test_gqa_mixed_split_scores_answered_and_writes_predictions(tmp_path):
  _write(tmp_path / 'testdev_balanced_questions.json', {
      'a': {'imageId': 'i1', 'question': 'Qa?', 'answer': 'red'},
      'b': {'imageId': 'i1', 'question': 'Qb?', 'answer': 'left'},
      'c': {'imageId': 'i1', 'question': 'Qc?'},  # no answer: submission only
      'd': {'imageId': 'i2', 'question': 'Qd?', 'answer': 'yes'},  # image missing
      'e': {'question': 'Qe?', 'answer': 'no'},  # malformed: no imageId
  })
  _image(tmp_path / 'images' / 'i1.jpg')
  out = tmp_path / 'out'
  result = evaluate.run(Answerer({'Qa?': 'Red.', 'Qb?': 'right', 'Qc?': 'Blue.'}),
                        tiny.get_config(), 'gqa', str(tmp_path), str(out), batch_size=4)
  assert result['split'] == 'testdev'
  assert (result['num_questions'], result['num_answered'], result['num_scored'],
          result['num_for_submission']) == (5, 3, 2, 1)
  assert result['skipped'] == {'malformed_question': 1, 'missing_image': 1}
  assert result['problems']['missing_image'][0].startswith('d: ')
  # Scored over the 3 answered-reference questions that loaded: a right, b wrong, d unanswered.
  assert result['scores']['accuracy'] == pytest.approx(100 / 3)
  rows = json.loads((out / 'gqa_testdev_predictions.json').read_text())
  assert rows == [{'questionId': 'a', 'prediction': 'red'},
                  {'questionId': 'b', 'prediction': 'right'},
                  {'questionId': 'c', 'prediction': 'blue'},
                  {'questionId': 'd', 'prediction': ''}]


def test_vizwiz_test_writes_image_answer_list(tmp_path):
  _write(tmp_path / 'Annotations' / 'test.json', [
      {'image': 'VizWiz_test_00000000.jpg', 'question': 'What is this?'},
      {'image': 'VizWiz_test_00000001.jpg', 'question': 'What color?'}])
  for i in (0, 1):
    _image(tmp_path / 'test' / f'VizWiz_test_{i:08d}.jpg')
  out = tmp_path / 'out'
  result = evaluate.run(Answerer({'What is this?': 'Unanswerable.', 'What color?': 'Blue'}),
                        tiny.get_config(), 'vizwiz', str(tmp_path), str(out), split='test')
  assert (result['num_scored'], result['num_for_submission']) == (0, 2)
  rows = json.loads((out / 'vizwiz_test_submission.json').read_text())
  assert rows == [{'image': 'VizWiz_test_00000000.jpg', 'answer': 'unanswerable'},
                  {'image': 'VizWiz_test_00000001.jpg', 'answer': 'blue'}]


def test_malformed_file_is_a_clear_error(tmp_path):
  (tmp_path / 'v2_OpenEnded_mscoco_val2014_questions.json').write_text('{"questions": [')
  with pytest.raises(ValueError, match='not valid JSON'):
    evaluate.run(None, tiny.get_config(), 'vqav2', str(tmp_path), str(tmp_path / 'o'))


def test_file_of_another_shape_is_a_clear_error(tmp_path):
  (tmp_path / 'testdev_balanced_questions.json').write_text('[1, 2]')  # a list, not a dict
  with pytest.raises(ValueError, match='gqa: a benchmark file .* is malformed'):
    evaluate.run(None, tiny.get_config(), 'gqa', str(tmp_path), str(tmp_path / 'o'))
