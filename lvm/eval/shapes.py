"""The `shapes` test split (lvm.data.shapes): each question asked alone, exact-match scored.

Questions are asked as in training (no answer-format suffix), one per image: the first turn
of each test conversation carries `<image>`, later turns are asked about the same image.
An answer is right when, lower-cased and stripped of spaces and a final period, it equals
the reference. The image-blind majority baseline is reported beside the accuracy.
"""

import collections
import json

from lvm.eval.base import Example, mean


def clean(text: str) -> str:
  return text.strip().rstrip('.').strip().lower()


def load(data_dir: str, config) -> list[Example]:
  """`data_dir` is unused (the split is generated from the run's config, deterministic)."""
  del data_dir
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  s = shapes.settings(config)
  examples = []
  for key, ex in shapes.examples(s, config.data.test_split):
    # The scene at its own aspect ratio (varied when `data.shapes.max_aspect` > 1, as anyres
    # runs train on).
    image = shapes.draw([tuple(o) for o in json.loads(ex['scene'])], s.image_size,
                        tuple(ex['shape']))
    turns = ex['conversations']
    for k in range(0, len(turns), 2):
      question = turns[k]['value'].replace('<image>\n', '').replace('<image>', '').strip()
      examples.append(Example(
          question_id=f'{key}/{k // 2}', prompt=question, image=image,
          target={'answer': turns[k + 1]['value'], 'type': ex['question_types'][k // 2]}))
  return examples


def score(examples, predictions, config=None):
  right = [clean(predictions.get(e.question_id, '')) == clean(e.target['answer'])
           for e in examples]
  by_type = collections.defaultdict(list)
  for e, r in zip(examples, right):
    by_type[e.target['type']].append(r)
  result = {'accuracy': 100 * mean(right), 'num_questions': len(examples),
            'accuracy_by_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())}}
  if config is not None:
    try:
      from lvm.data import shapes  # pylint: disable=g-import-not-at-top
      result['blind_baseline'] = 100 * shapes.load_baseline(config)['test']['overall']
    except (OSError, KeyError):
      pass  # not prepared in this data_dir: no baseline to show
  return result
