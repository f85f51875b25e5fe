"""lvm.evaluate.run with a scripted answerer: files written, skips counted, scores right."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from lvm import evaluate
from lvm.generate import Output


class ScriptedAnswerer:
  """Stands in for TextGenerator: answers by the question text, records what it was given."""

  def __init__(self, script):
    self.script = script
    self.calls = []

  def answer(self, conversations, images, max_new_tokens, sampling, min_batch=1):
    assert min_batch >= len(conversations)
    self.calls.append((conversations, images, max_new_tokens))
    return [Output([], 'stop', self.script.get(c[-1]['value'].split('\n')[1], ''))
            for c in conversations]


def test_pope_run_writes_answers_and_counts_skips(tmp_path):
  config = tiny.get_config()
  size = config.model.vision.image_size
  (tmp_path / 'val2014').mkdir()
  for i in (1, 2, 3):
    Image.new('RGB', (40, 20), (i * 50, 0, 0)).save(tmp_path / 'val2014' / f'{i}.jpg')
  (tmp_path / 'val2014' / '4.jpg').write_bytes(b'not a jpeg')  # corrupt
  rows = [(1, 'yes'), (2, 'no'), (3, 'yes'), (4, 'no'), (5, 'yes')]  # 5.jpg is missing
  (tmp_path / 'coco_pope_random.json').write_text(''.join(
      json.dumps({'question_id': i, 'image': f'{i}.jpg', 'text': f'Is there a thing {i}?',
                  'label': label}) + '\n' for i, label in rows))
  answerer = ScriptedAnswerer({f'Is there a thing {i}?': a for i, a in
                               [(1, 'Yes'), (2, 'Yes, there is.'), (3, 'No, not at all.')]})
  out = tmp_path / 'out'
  result = evaluate.run(answerer, config, 'pope', str(tmp_path), str(out), batch_size=2)
  assert result['skipped'] == {'corrupt_image': 1, 'missing_image': 1}
  assert result['num_questions'] == 5 and result['num_answered'] == 3
  # Every question went out with one preprocessed image and the short-answer prompt.
  turns = [c[-1]['value'] for conv, _, _ in answerer.calls for c in conv]
  assert all(t.startswith('<image>\nIs there a thing ') for t in turns)
  assert all(t.endswith('\nAnswer the question using a single word or phrase.') for t in turns)
  imgs = [x for _, batch, _ in answerer.calls for x in batch]
  assert all(x.shape == (1, size, size, 3) and x.dtype == np.float32 for x in imgs)
  # Answered: 1 yes/yes (TP), 2 no/yes (FP), 3 yes/no (FN); unanswered questions count as
  # wrong: 4 (label no) as FP, 5 (label yes) as FN.
  r = result['scores']['random']
  assert (r['tp'], r['fp'], r['tn'], r['fn']) == (1, 2, 0, 2)
  assert r['accuracy'] == pytest.approx(20.0)
  lines = [json.loads(l) for l in (out / 'answers.jsonl').read_text().splitlines()]
  assert [l['question_id'] for l in lines] == ['random/1', 'random/2', 'random/3']
  assert lines[1] == {'question_id': 'random/2', 'answer': 'Yes, there is.',
                      'prompt': 'Is there a thing 2?\nAnswer the question using a single '
                                'word or phrase.'}
  assert json.loads((out / 'score.json').read_text())['headline'] == {'f1_mean': r['f1']}


def test_unknown_benchmark_and_empty_data_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='Unknown benchmark'):
    evaluate.run(None, tiny.get_config(), 'vqa3', str(tmp_path), str(tmp_path))
  with pytest.raises(FileNotFoundError, match='testdev_balanced_questions'):
    evaluate.run(None, tiny.get_config(), 'gqa', str(tmp_path), str(tmp_path))
