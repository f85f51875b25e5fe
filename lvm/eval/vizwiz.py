"""VizWiz-VQA: questions from blind people, many of them unanswerable from the photo.

Prompt (LLaVA-1.5's `llava_test.jsonl`, haotian-liu/LLaVA scripts/v1_5/eval/vizwiz.sh):
"<question>\\nWhen the provided information is insufficient, respond with 'Unanswerable'.\\n
Answer the question using a single word or phrase."

Layout (under --data_dir, the official VizWiz-VQA download): `Annotations/<split>.json`, a
list of {image, question, answers: [{answer, answer_confidence}] x10, answer_type,
answerable} (test: {image, question} only), images `<split>/<image>` (e.g.
val/VizWiz_val_00000000.jpg; or directly in data_dir or data_dir/images). One question per
image, so the image name is the question id.

Scoring (val): the VQA accuracy that the VizWiz evaluation code inherits from VQAv2:
the EvalAI-normalized answer, min(#humans / 3, 1) over the ten leave-one-out subsets
(`vqa.vqav2_accuracy`); 'unanswerable' is an answer like any other, so answering
"Unanswerable." where the humans said so scores. Reported also per answer_type
(yes/no, number, other, unanswerable) and the share of predictions that are
'unanswerable'. (lmms-eval's tasks/vizwiz_vqa/utils.py `vizwiz_vqa_process_results`
normalizes the human answers too; the two differ only where all humans agree on an
unnormalized spelling. The published number is EvalAI's test-dev score either way.)

Submission (test, the LLaVA-1.5 number 50.0 is test-dev on EvalAI): a JSON list of
{image, answer}, answers EvalAI-normalized, one per test question in file order
(LLaVA's scripts/convert_vizwiz_for_submission.py; the VizWiz-VQA results format, which
keys results by `image` where VQAv2 uses `question_id`).
"""

import collections
import os

from lvm import registry
from lvm.eval import vqa
from lvm.eval.base import (SHORT_ANSWER, Benchmark, Example, Issues, find_file, image_path,
                           mean, read_json)

UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
SPLITS = ('val', 'test')


def prompt(question: str) -> str:
  return f'{question}\n{UNANSWERABLE}\n{SHORT_ANSWER}'


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  split = split or SPLITS[0]
  issues = issues if issues is not None else Issues()
  try:
    path = find_file(data_dir, f'Annotations/{split}.json')
  except FileNotFoundError:
    path = find_file(data_dir, f'{split}.json', what=f'VizWiz Annotations/{split}.json')
  rows = read_json(path, 'VizWiz annotations')
  examples = []
  for q in rows:
    try:
      name = q['image']
      answers = [a['answer'] for a in q.get('answers') or []]
      examples.append(Example(
          question_id=name, prompt=prompt(q['question']),
          image=image_path(data_dir, os.path.join(split, name), name,
                           os.path.join('images', name)),
          target={'answers': answers, 'answer_type': q.get('answer_type', 'unknown')},
          answered=bool(answers)))
    except (KeyError, TypeError) as e:
      issues.add('malformed_question', f'{q!r:.150}: {e!r}')
  return examples


def score(examples, predictions, config=None):
  accs = [vqa.vqav2_accuracy(predictions.get(e.question_id, ''), e.target['answers'])
          for e in examples]
  by_type = collections.defaultdict(list)
  for e, acc in zip(examples, accs):
    by_type[e.target['answer_type']].append(acc)
  said_unanswerable = [vqa.normalize(predictions.get(e.question_id, '')) == 'unanswerable'
                       for e in examples]
  return {'accuracy': 100 * mean(accs), 'num_questions': len(examples),
          'accuracy_by_answer_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())},
          'predicted_unanswerable': 100 * mean(said_unanswerable)}


def submission(examples, predictions, split, data_dir=None):
  del data_dir
  if all(e.answered for e in examples):
    return None
  return f'vizwiz_{split}_submission.json', [
      {'image': e.question_id, 'answer': vqa.normalize(predictions.get(e.question_id, ''))}
      for e in examples]


registry.BENCHMARK.register('vizwiz', Benchmark(
    'vizwiz', lambda d, c=None, split=None, issues=None: load(d, split, issues), score,
    lambda s: ('accuracy', s['accuracy']), splits=SPLITS, submission=submission))
