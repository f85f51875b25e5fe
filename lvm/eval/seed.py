"""SEED-Bench (image): four-option multiple choice over the nine image dimensions.

Layout (under --data_dir, the official release): `SEED-Bench.json` ({'questions':
[{question_id, question, choice_a..choice_d, answer (a letter), data_id, data_type
('image' | 'video'), question_type_id}], 'question_type': {name: id}}) and images
`SEED-Bench-image/<data_id>` (or directly in data_dir). Only `data_type == 'image'`
questions are asked (question types 1-9); video questions are not part of this benchmark
(neither asked nor in the denominator).

Prompt (LLaVA-1.5's `llava-seed-bench.jsonl`, haotian-liu/LLaVA scripts/v1_5/eval/seed.sh):
the question, "A. <choice_a>" ... "D. <choice_d>" lines, then "Answer with the option's
letter from the given choices directly."

Scoring (LLaVA's scripts/convert_seed_for_submission.py): right when the answer, stripped,
is exactly the reference letter; accuracy overall and per question type (by its name). An
answer that is not a single letter A-D is counted as `unparseable` (with examples) and
wrong. LLaVA-1.5 7B's published SEED 58.6 counts image and video questions together, so
this image-only accuracy is not directly comparable with it.
"""

import collections
import os

from lvm import registry
from lvm.eval.base import (OPTION_LETTER, Benchmark, Example, Issues, find_file, image_path,
                           mean, read_json)

LETTERS = ('A', 'B', 'C', 'D')


def prompt(q: dict) -> str:
  lines = [q['question']]
  lines += [f"{letter}. {q['choice_' + letter.lower()]}" for letter in LETTERS]
  return '\n'.join(lines + [OPTION_LETTER])


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  del split  # one split (the answers are public)
  issues = issues if issues is not None else Issues()
  data = read_json(find_file(data_dir, 'SEED-Bench.json', what='SEED-Bench.json'),
                   'SEED-Bench')
  names = {int(i): n for n, i in data.get('question_type', {}).items()}
  examples = []
  for q in data['questions']:
    if q.get('data_type') != 'image':
      continue
    try:
      if q['answer'] not in LETTERS:
        raise ValueError(f"answer {q['answer']!r}")
      examples.append(Example(
          question_id=q['question_id'], prompt=prompt(q),
          image=image_path(data_dir, os.path.join('SEED-Bench-image', q['data_id']),
                           q['data_id']),
          target={'answer': q['answer'],
                  'type': names.get(q['question_type_id'], str(q['question_type_id']))}))
    except (KeyError, TypeError, ValueError) as e:
      issues.add('malformed_question', f'{q!r:.150}: {e!r}')
  return examples


def score(examples, predictions, config=None):
  right, by_type = [], collections.defaultdict(list)
  unparseable, bad = 0, []
  for e in examples:
    answer = predictions.get(e.question_id)
    if answer is not None and answer.strip() not in LETTERS:
      unparseable += 1
      if len(bad) < 5:
        bad.append(f'{e.question_id}: {answer!r:.100}')
    ok = answer is not None and answer.strip() == e.target['answer']
    right.append(ok)
    by_type[e.target['type']].append(ok)
  return {'accuracy': 100 * mean(right), 'num_questions': len(examples),
          'accuracy_by_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())},
          'unparseable': unparseable, 'unparseable_examples': bad}


registry.BENCHMARK.register('seed', Benchmark(
    'seed', lambda d, c=None, split=None, issues=None: load(d, split, issues), score,
    lambda s: ('image_accuracy', s['accuracy']), splits=('image',)))
