"""MMMU: college-level multiple-choice and open questions, scored with MMMU's own parsing.

Splits: validation (scored here) and test (answers not public: written for MMMU's EvalAI
server as {id: answer}, the format of MMMU eval/README.md's `main_eval_only.py`: the
parsed letter for multiple choice, the raw response for open questions).

Layout (under --data_dir), either the official Hugging Face release MMMU/MMMU, one folder
per subject with `<split>-00000-of-00001.parquet` (columns id, question, options (a
Python list literal), answer, question_type ('multiple-choice' | 'open'), image_1..image_7
({bytes, path})), read with pyarrow; or the same rows as JSON lines in
`mmmu_<split>.jsonl`, image_k then a file path relative to data_dir. As LLaVA-1.5 is a
single-image model, only image_1 is given (MMMU's eval/run_llava.py does the same); the
"<image 1>" placeholders stay in the text.

Prompt (MMMU eval/configs/llava1.5.yaml with `construct_prompt`): multiple choice:
"<question>\\n\\n(A) <option>\\n(B) <option>\\n\\n\\nAnswer with the option's letter from
the given choices directly."; open: "<question>\\n\\nAnswer the question using a single
word or phrase."

Scoring (MMMU-Benchmark/MMMU eval/eval_utils.py): multiple choice through
`parse_multi_choice_response` ("(B)", then " B ", then, for answers over 5 words, an
option's text; of several candidates the last one in the answer; with none, a random
choice from random.Random(42) in question order, counted in `unparseable` with examples),
right when equal to the answer letter. Open questions through `parse_open_response`
(key sub-responses after "is", "so", "therefore", "answer", "=", ...; numbers extracted
and rounded to 2 decimals) and `eval_open` (a float equal to a normalized gold number, or
a gold string contained in a predicted string). Accuracy overall, per subject and per
question type.
"""

import ast
import collections
import glob
import json
import os
import random
import re

from lvm import registry
from lvm.eval.base import (OPTION_LETTER, SHORT_ANSWER, Benchmark, Example, Issues, mean,
                           read_jsonl)

SPLITS = ('validation', 'test')


def parse_multi_choice(response: str, all_choices, index2ans, rng) -> tuple[str, bool]:
  """MMMU's parse_multi_choice_response -> (letter, parsed); parsed False = random guess."""
  for char in (',', '.', '!', '?', ';', ':', "'"):
    response = response.strip(char)
  response = f' {response} '
  index_ans, with_brackets = True, False
  candidates = [c for c in all_choices if f'({c})' in response]
  with_brackets = bool(candidates)
  if not candidates:
    candidates = [c for c in all_choices if f' {c} ' in response]
  if not candidates and len(response.split()) > 5:
    candidates = [k for k, v in index2ans.items() if v.lower() in response.lower()]
    index_ans = not candidates
  if not candidates:
    return rng.choice(all_choices), False
  if len(candidates) == 1:
    return candidates[0], True
  if index_ans:
    fmt = '({})' if with_brackets else ' {} '
    starts = [response.rfind(fmt.format(c)) for c in candidates]
  else:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))], True


def _is_number(text: str) -> bool:
  try:
    float(text.replace(',', ''))
    return True
  except ValueError:
    return False


def normalize_str(text: str) -> list:
  text = text.strip()
  if _is_number(text):
    return [round(float(text.replace(',', '')), 2)]
  text = text.lower()
  return [' ' + text, text + ' '] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
  commas = re.findall(r'-?\b\d{1,3}(?:,\d{3})+\b', text)
  scientific = re.findall(r'-?\d+(?:\.\d+)?[eE][+-]?\d+', text)
  simple = re.findall(r'-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])', text)
  return commas + scientific + simple


def parse_open(response: str) -> list:
  """MMMU's parse_open_response: the normalized candidate answers in `response`."""
  response = response.strip().strip('.').lower()
  subs = re.split(r'\.\s(?=[A-Z])|\n', response)
  indicators = ['could be ', 'so ', 'is ', 'thus ', 'therefore ', 'final ', 'answer ',
                'result ']
  keys = []
  for i, sub in enumerate(subs):
    if i == len(subs) - 1:
      indicators.append('=')
    shortest = None
    for indicator in indicators:
      if indicator in sub:
        tail = sub.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in (':', ',', '.', '!', '?', ';', "'"):
      keys.append(shortest)
  keys = keys or [response]
  preds = list(keys)
  for key in keys:
    preds.extend(extract_numbers(key))
  out = []
  for p in preds:
    out.extend(normalize_str(p))
  return list(dict.fromkeys(out))  # the official dedups with set(); order is irrelevant


def eval_open(gold, preds: list) -> bool:
  golds = []
  for g in (gold if isinstance(gold, list) else [gold]):
    golds.extend(normalize_str(str(g)))
  for p in preds:
    if isinstance(p, str):
      if any(isinstance(g, str) and g in p for g in golds):
        return True
    elif p in golds:
      return True
  return False


def prompt(question: str, options: list[str]) -> str:
  if not options:
    return f'{question}\n\n{SHORT_ANSWER}'
  listed = ''.join(f'({chr(65 + i)}) {o}\n' for i, o in enumerate(options))
  return f'{question}\n\n{listed}\n\n{OPTION_LETTER}'


def _rows(data_dir: str, split: str, issues: Issues) -> list[tuple[dict, object]]:
  """(row, image_1 as bytes or a path) from the parquet files or mmmu_<split>.jsonl."""
  parquet = sorted(glob.glob(os.path.join(data_dir, '**', f'{split}-*.parquet'),
                             recursive=True))
  if parquet:
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError('MMMU parquet files need pyarrow (pip install pyarrow), or give '
                       f'mmmu_{split}.jsonl instead') from None
    rows = []
    for path in parquet:
      for row in pq.read_table(path).to_pylist():
        image = row.get('image_1')
        rows.append((row, image.get('bytes') if isinstance(image, dict) else None))
    return rows
  paths = sorted(glob.glob(os.path.join(data_dir, '**', f'mmmu_{split}.jsonl'),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f'No MMMU {split}-*.parquet or mmmu_{split}.jsonl under '
                            f'{data_dir!r}')
  return [(r, os.path.join(data_dir, r['image_1']) if r.get('image_1') else None)
          for r in read_jsonl(paths[0], issues)]


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  split = split or SPLITS[0]
  issues = issues if issues is not None else Issues()
  examples = []
  for row, image in _rows(data_dir, split, issues):
    try:
      options = row['options']
      options = ast.literal_eval(options) if isinstance(options, str) else list(options)
      answer = row['answer']
      if isinstance(answer, str) and answer.startswith('['):
        answer = ast.literal_eval(answer)
      kind = 'multiple-choice' if row['question_type'] == 'multiple-choice' else 'open'
      if kind == 'multiple-choice' and not options:
        raise ValueError('multiple-choice without options')
      subject = row['id'].split('_', 1)[1].rsplit('_', 1)[0]  # validation_Art_Theory_3
      examples.append(Example(
          question_id=row['id'], prompt=prompt(row['question'], options if kind != 'open'
                                               else []),
          image=image, target={'answer': answer, 'options': options, 'type': kind,
                               'subject': subject},
          answered=split != 'test'))  # the test answers are withheld ('?')
    except (KeyError, TypeError, ValueError, SyntaxError, IndexError) as e:
      issues.add('malformed_question', f'{json.dumps(row, default=str)[:150]}: {e!r}')
  return examples


def score(examples, predictions, config=None):
  rng = random.Random(42)
  right, unparseable, bad = [], 0, []
  by_subject, by_type = collections.defaultdict(list), collections.defaultdict(list)
  for e in examples:
    t = e.target
    answer = predictions.get(e.question_id)
    if answer is None:
      ok = False
    elif t['type'] == 'multiple-choice':
      letters = [chr(65 + i) for i in range(len(t['options']))]
      letter, parsed = parse_multi_choice(answer, letters, dict(zip(letters, t['options'])),
                                          rng)
      if not parsed:
        unparseable += 1
        if len(bad) < 5:
          bad.append(f'{e.question_id}: {answer!r:.100} (guessed {letter})')
      gold = t['answer'] if isinstance(t['answer'], list) else [t['answer']]
      ok = letter in gold
    else:
      ok = eval_open(t['answer'], parse_open(answer))
    right.append(ok)
    by_subject[t['subject']].append(ok)
    by_type[t['type']].append(ok)
  return {'accuracy': 100 * mean(right), 'num_questions': len(examples),
          'accuracy_by_subject': {k: 100 * mean(v) for k, v in sorted(by_subject.items())},
          'accuracy_by_type': {k: 100 * mean(v) for k, v in sorted(by_type.items())},
          'unparseable': unparseable, 'unparseable_examples': bad}


def submission(examples, predictions, split, data_dir=None):
  del data_dir
  if all(e.answered for e in examples):
    return None
  rng, rows = random.Random(42), {}
  for e in examples:
    answer = predictions.get(e.question_id, '')
    if e.target['type'] == 'multiple-choice':
      letters = [chr(65 + i) for i in range(len(e.target['options']))]
      answer = parse_multi_choice(answer, letters, dict(zip(letters, e.target['options'])),
                                  rng)[0]
    rows[e.question_id] = answer
  return f'mmmu_{split}_submission.json', rows


registry.BENCHMARK.register('mmmu', Benchmark(
    'mmmu', lambda d, c=None, split=None, issues=None: load(d, split, issues), score,
    lambda s: ('accuracy', s['accuracy']), max_new_tokens=128, splits=SPLITS,
    submission=submission))
