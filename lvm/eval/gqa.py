"""GQA test-dev balanced: exact match, as the official eval.py after LLaVA's answer cleanup.

Layout (under --data_dir): `testdev_balanced_questions.json` ({question_id: {imageId,
question, answer, types: {structural, semantic, detailed}}}) and images
`images/<imageId>.jpg` (or directly in data_dir).
"""

import collections
import json
import os

from lvm.eval.base import Example, find_file, image_path, mean, short_answer_prompt


def clean(prediction: str) -> str:
  """LLaVA's convert_gqa_for_eval.py: drop trailing periods, lower case (and strip)."""
  return prediction.strip().rstrip('.').lower()


def load(data_dir: str) -> list[Example]:
  path = find_file(data_dir, 'testdev_balanced_questions.json',
                   what='GQA testdev_balanced_questions.json')
  with open(path) as f:
    questions = json.load(f)
  examples = []
  for qid, q in questions.items():
    name = f"{q['imageId']}.jpg"
    examples.append(Example(
        question_id=qid, prompt=short_answer_prompt(q['question']),
        image=image_path(data_dir, os.path.join('images', name), name),
        target={'answer': q['answer'],
                'structural': q.get('types', {}).get('structural', 'unknown')}))
  return examples


def score(examples, predictions):
  right = [clean(predictions.get(e.question_id, '')) == e.target['answer'] for e in examples]
  by_type = collections.defaultdict(list)
  for e, r in zip(examples, right):
    by_type[e.target['structural']].append(r)
  return {'accuracy': 100 * mean(right), 'num_questions': len(examples),
          'accuracy_by_structural_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())}}
