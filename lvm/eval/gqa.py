"""GQA: exact match, as the official eval.py after LLaVA's answer cleanup.

Layout (under --data_dir): `<split>_balanced_questions.json` (default split testdev, the
one LLaVA-1.5 reports; or `<split>_all_questions.json`) ({question_id: {imageId, question,
answer?, types: {structural, semantic, detailed}}}) and images `images/<imageId>.jpg` (or
directly in data_dir). Questions without `answer` (the test / submission splits) are
answered for submission only.

Predictions file (always written, the input of GQA's eval.py and its server): a JSON list
of {questionId, prediction}, the answers cleaned as LLaVA's scripts/convert_gqa_for_eval.py
does (trailing periods dropped, lower case).
"""

import collections
import glob
import os

from lvm.eval.base import (Example, Issues, find_file, image_path, mean, read_json,
                           short_answer_prompt)

SPLITS = ('testdev', 'test', 'challenge', 'submission', 'val')


def clean(prediction: str) -> str:
  """LLaVA's convert_gqa_for_eval.py: drop trailing periods, lower case (and strip)."""
  return prediction.strip().rstrip('.').lower()


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  split = split or SPLITS[0]
  name = f'{split}_balanced_questions.json'
  if not glob.glob(os.path.join(data_dir, '**', name), recursive=True):
    name = f'{split}_all_questions.json' if split != 'testdev' else name
  questions = read_json(find_file(data_dir, name, what=f'GQA {name}'), 'GQA questions')
  examples = []
  for qid, q in questions.items():
    try:
      image = f"{q['imageId']}.jpg"
      examples.append(Example(
          question_id=qid, prompt=short_answer_prompt(q['question']),
          image=image_path(data_dir, os.path.join('images', image), image),
          target={'answer': q.get('answer'),
                  'structural': q.get('types', {}).get('structural', 'unknown')},
          answered='answer' in q))
    except (KeyError, TypeError, AttributeError) as e:
      if issues is None:
        raise
      issues.add('malformed_question', f'{qid}: {e!r}')
  return examples


def submission(examples, predictions, split, data_dir=None):
  del data_dir
  return f'gqa_{split}_predictions.json', [
      {'questionId': e.question_id, 'prediction': clean(predictions.get(e.question_id, ''))}
      for e in examples]


def score(examples, predictions):
  right = [clean(predictions.get(e.question_id, '')) == e.target['answer'] for e in examples]
  by_type = collections.defaultdict(list)
  for e, r in zip(examples, right):
    by_type[e.target['structural']].append(r)
  return {'accuracy': 100 * mean(right), 'num_questions': len(examples),
          'accuracy_by_structural_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())}}
