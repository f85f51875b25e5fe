"""POPE (object hallucination): yes/no questions in three splits (adversarial, popular, random).

Layout (under --data_dir): the official jsonl files `coco_pope_<split>.json` (one object a
line: {question_id, image, text, label: yes|no}) and the COCO images they name, in
`val2014/` (or directly in data_dir, or in images/).

Scoring (LLaVA's eval_pope.py): keep the first sentence of the answer, drop commas; it is
"no" if one of its space-separated words is "No", "no" or "not", else "yes". Per split:
accuracy, precision, recall and F1 with "yes" as the positive class, and the yes-ratio.
"""

import collections
import json
import os

from lvm.eval.base import Example, find_file, image_path, short_answer_prompt

SPLITS = ('adversarial', 'popular', 'random')


def to_yes_no(prediction: str) -> str:
  text = prediction
  if '.' in text:
    text = text.split('.')[0]
  words = text.replace(',', '').split(' ')
  return 'no' if ('No' in words or 'not' in words or 'no' in words) else 'yes'


def metrics(labels: list[str], predictions: list[str]) -> dict:
  """POPE's metrics (in %) for yes/no labels and yes/no predictions."""
  pairs = list(zip(labels, predictions))
  tp = sum(1 for l, p in pairs if l == 'yes' and p == 'yes')
  fp = sum(1 for l, p in pairs if l == 'no' and p == 'yes')
  tn = sum(1 for l, p in pairs if l == 'no' and p == 'no')
  fn = sum(1 for l, p in pairs if l == 'yes' and p == 'no')
  n = len(pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {'accuracy': 100 * (tp + tn) / n if n else 0.0, 'precision': 100 * precision,
          'recall': 100 * recall, 'f1': 100 * f1,
          'yes_ratio': 100 * (tp + fp) / n if n else 0.0, 'num_questions': n,
          'tp': tp, 'fp': fp, 'tn': tn, 'fn': fn}


def load(data_dir: str) -> list[Example]:
  examples = []
  for split in SPLITS:
    try:
      path = find_file(data_dir, f'coco_pope_{split}.json')
    except FileNotFoundError:
      continue
    with open(path) as f:
      for line in f:
        if not line.strip():
          continue
        q = json.loads(line)
        if q['label'] not in ('yes', 'no'):
          raise ValueError(f'{path}: question {q["question_id"]} has label {q["label"]!r}, '
                           "expected 'yes' or 'no'")
        examples.append(Example(
            question_id=f"{split}/{q['question_id']}", prompt=short_answer_prompt(q['text']),
            image=image_path(data_dir, os.path.join('val2014', q['image']), q['image'],
                             os.path.join('images', q['image'])),
            target={'label': q['label'], 'split': split}))
  if not examples:
    raise FileNotFoundError(f'No coco_pope_{{{",".join(SPLITS)}}}.json under {data_dir!r}')
  return examples


def score(examples, predictions):
  by_split = collections.defaultdict(lambda: ([], []))
  for e in examples:
    labels, preds = by_split[e.target['split']]
    labels.append(e.target['label'])
    if e.question_id in predictions:
      preds.append(to_yes_no(predictions[e.question_id]))
    else:  # unanswered (e.g. a missing image) counts as wrong
      preds.append('no' if e.target['label'] == 'yes' else 'yes')
  result = {split: metrics(*by_split[split]) for split in SPLITS if split in by_split}
  per_split = list(result.values())
  result['f1_mean'] = sum(r['f1'] for r in per_split) / len(per_split)
  result['accuracy_mean'] = sum(r['accuracy'] for r in per_split) / len(per_split)
  return result
