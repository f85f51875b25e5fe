"""MMBench (dev): multiple choice with circular evaluation and MMBench's answer matching.

Layout (under --data_dir): the official TSV, `mmbench_dev_20230712.tsv` (LLaVA-1.5's
scripts/v1_5/eval/mmbench.sh; any `mmbench_dev*.tsv`, or `--split=dev_cn` for
`mmbench_dev_cn*.tsv`), one row a question with columns index, question, hint, A, B, C, D
(unused options empty / nan), answer (a letter), category, l2-category and image (the
base64-encoded image; an all-digit value names the row whose image it shares, as in
VLMEvalKit's TSVs).

Prompt (haotian-liu/LLaVA llava/eval/model_vqa_mmbench.py with --single-pred-prompt): the
hint (when not empty) + "\\n" + the question, one "\\nX. option" line per option, then
"\\nAnswer with the option's letter from the given choices directly." (MMBench-CN:
"请直接回答选项字母。").

Circular evaluation (MMBench's CircularEval; LLaVA's --all-rounds): a question with N
options is asked N times, the options rotated by one each round (round r shows options
r, r+1, ... under the letters A, B, ...); it counts as right only if every round's answer
maps back to the right option. `accuracy_round0` is the plain single-pass accuracy.

Answer matching (MMBench / VLMEvalKit `vlmeval/utils/matching_util.py` `can_infer`, the
exact-matching stage before any LLM judge): `can_infer_option` replaces .()[],:;!*#{}
with spaces and splits on whitespace; exactly one option letter among the words is the
answer (but a lone "A" in an answer of more than 3 words is read as an article: no
match); a refusal phrase or a bare "Z" means no option. Failing that, `can_infer_text`:
exactly one option text contained in the lower-cased answer. Anything else is
unparseable, counted (with examples) and wrong.
"""

import base64
import binascii
import collections
import csv
import glob
import math
import os
import sys

from lvm import registry
from lvm.eval.base import OPTION_LETTER, Benchmark, Example, Issues, mean

LETTERS = ('A', 'B', 'C', 'D')
OPTION_LETTER_CN = '请直接回答选项字母。'
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", 'Cannot determine the answer')
SPLITS = ('dev', 'dev_cn')


def is_none(value) -> bool:
  """LLaVA's is_none: missing, NaN, 'nan' or 'none' (any case); also an empty cell."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return True
  return isinstance(value, str) and value.strip().lower() in ('', 'nan', 'none')


def can_infer_option(answer: str, letters) -> str | None:
  """The option letter named in `answer`, 'Z' for a refusal, or None."""
  if any(r in answer for r in REFUSALS):
    return 'Z'
  text = answer
  for c in '.()[],:;!*#{}':
    text = text.replace(c, ' ')
  words = text.split()
  named = [c for c in letters if c in words]
  if len(named) == 1:
    return None if ('A' in words and len(words) > 3) else named[0]
  if not named and 'Z' in words:
    return 'Z'
  return None


def can_infer_text(answer: str, options: dict) -> str | None:
  """The one option whose text the (lower-cased) answer contains, or None."""
  found = [k for k, v in options.items() if str(v).lower() in answer.lower()]
  return found[0] if len(found) == 1 else None


def match(answer: str, options: dict) -> str | None:
  """MMBench's `can_infer`: options {letter: text} -> the chosen letter, 'Z' or None."""
  return can_infer_option(answer, list(options)) or can_infer_text(answer, options)


def prompt(question: str, hint, options: list[str], cn: bool = False) -> str:
  text = question if is_none(hint) else f'{hint}\n{question}'
  for letter, option in zip(LETTERS, options):
    text += f'\n{letter}. {option}'
  return f"{text}\n{OPTION_LETTER_CN if cn else OPTION_LETTER}"


def _tsv(data_dir: str, split: str) -> str:
  pattern = 'mmbench_dev_cn*.tsv' if split == 'dev_cn' else 'mmbench_dev_[0-9]*.tsv'
  paths = sorted(glob.glob(os.path.join(data_dir, '**', pattern), recursive=True))
  if not paths and split == 'dev':
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, '**', 'mmbench_dev*.tsv'),
                                        recursive=True) if '_cn' not in p)
  if not paths:
    raise FileNotFoundError(f'No MMBench {split} TSV ({pattern!r}) under {data_dir!r}')
  return paths[0]


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  split = split or SPLITS[0]
  issues = issues if issues is not None else Issues()
  csv.field_size_limit(sys.maxsize)  # base64 images are far over csv's 128 KiB default
  path = _tsv(data_dir, split)
  with open(path, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f, delimiter='\t'))
  missing = {'index', 'question', 'answer', 'image', 'A', 'B'} - set(rows[0] if rows else ())
  if missing:
    raise ValueError(f'{path}: not an MMBench dev TSV (no column {sorted(missing)})')
  images = {r['index']: r['image'] for r in rows}
  examples = []
  for r in rows:
    options = []
    for letter in LETTERS:
      if is_none(r.get(letter)):
        break
      options.append(r[letter])
    if len(options) < 2 or r['answer'] not in LETTERS[:len(options)]:
      issues.add('malformed_question', f"index {r['index']}: options {options}, answer "
                 f"{r['answer']!r}")
      continue
    raw = r['image']
    raw = images.get(raw, '') if raw.isdigit() and len(raw) < 16 else raw
    try:
      image = base64.b64decode(raw)
    except (binascii.Error, ValueError):
      image = b''  # counted per round as an unreadable image by the harness
    letters = list(LETTERS[:len(options)])
    for k in range(len(options)):  # round k: options rotated left k times
      shown, original = options[k:] + options[:k], letters[k:] + letters[:k]
      examples.append(Example(
          question_id=f"{r['index']}/{k}",
          prompt=prompt(r['question'], r.get('hint'), shown, cn=split == 'dev_cn'),
          image=image,
          target={'index': r['index'], 'answer': r['answer'], 'category': r.get('category'),
                  'options': dict(zip(letters, shown)), 'original': dict(zip(letters, original))}))
  return examples


def score(examples, predictions, config=None):
  rounds = collections.defaultdict(list)  # index -> [right?] over its rounds
  category = {}
  unparseable, bad = 0, []
  for e in examples:
    t = e.target
    answer = predictions.get(e.question_id)
    chosen = None if answer is None else match(answer, t['options'])
    if chosen is None and answer is not None:  # unanswered ones are counted as skipped
      unparseable += 1
      if len(bad) < 5:
        bad.append(f'{e.question_id}: {answer!r:.100}')
    rounds[t['index']].append((e.question_id.endswith('/0'),
                               t['original'].get(chosen) == t['answer']))
    category[t['index']] = t['category']
  circular = {i: all(right for _, right in r) for i, r in rounds.items()}
  by_category = collections.defaultdict(list)
  for i, right in circular.items():
    by_category[category[i]].append(right)
  return {'accuracy': 100 * mean(circular.values()),
          'accuracy_round0': 100 * mean(right for r in rounds.values()
                                        for first, right in r if first),
          'num_questions': len(circular), 'num_rounds': len(examples),
          'accuracy_by_category': {k: 100 * mean(v) for k, v in sorted(by_category.items())},
          'unparseable': unparseable, 'unparseable_examples': bad}


registry.BENCHMARK.register('mmbench', Benchmark(
    'mmbench', lambda d, c=None, split=None, issues=None: load(d, split, issues), score,
    lambda s: ('circular_accuracy', s['accuracy']), splits=SPLITS))
