"""ScienceQA-IMG: the test questions that have an image, answered with an option letter.

Layout (under --data_dir): `problems.json` ({pid: {question, choices, answer (index), hint,
image, split, ...}}), `pid_splits.json` ({'test': [pid, ...], ...}) and images
`images/test/<pid>/image.png` (or `test/<pid>/image.png`).

Prompt (LLaVA-1.5's llava_test_CQM-A + --single-pred-prompt): "Context: <hint>\n" when the
hint is not empty, the question, one "A. choice" line per option, then "Answer with the
option's letter from the given choices directly."

Scoring (LLaVA's eval_science_qa.py): the answer counts as a letter if it is exactly one
("B"), starts with a letter and ". " ("B. cat"), or contains exactly one "The answer is X.";
anything else is unparseable and counted wrong (and counted in `unparseable`).
"""

import json
import os
import re

from lvm.eval.base import OPTION_LETTER, Example, find_file, image_path, mean

OPTIONS = ('A', 'B', 'C', 'D', 'E')
_THE_ANSWER_IS = re.compile(r'The answer is ([A-Z]).')


def prompt(problem: dict) -> str:
  lines = []
  if problem.get('hint'):
    lines.append(f"Context: {problem['hint']}")
  lines.append(problem['question'])
  lines += [f'{OPTIONS[i]}. {c}' for i, c in enumerate(problem['choices'])]
  lines.append(OPTION_LETTER)
  return '\n'.join(lines)


def parse_letter(prediction: str) -> str | None:
  """The chosen option letter, or None when the answer cannot be parsed."""
  text = prediction.strip()
  if text in OPTIONS:
    return text
  if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == '. ':
    return text[0]
  found = _THE_ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 else None


def load(data_dir: str, split: str = 'test') -> list[Example]:
  with open(find_file(data_dir, 'problems.json', what='ScienceQA problems.json')) as f:
    problems = json.load(f)
  with open(find_file(data_dir, 'pid_splits.json', what='ScienceQA pid_splits.json')) as f:
    pids = json.load(f)[split]
  examples = []
  for pid in pids:
    problem = problems[pid]
    if not problem.get('image'):
      continue  # the IMG subset
    if len(problem['choices']) > len(OPTIONS):
      raise ValueError(f'ScienceQA {pid}: {len(problem["choices"])} choices > {len(OPTIONS)}')
    examples.append(Example(
        question_id=pid, prompt=prompt(problem),
        image=image_path(data_dir, os.path.join('images', split, pid, problem['image']),
                         os.path.join(split, pid, problem['image'])),
        target={'answer': OPTIONS[problem['answer']], 'num_choices': len(problem['choices'])}))
  return examples


def score(examples, predictions):
  right, unparseable = [], 0
  for e in examples:
    letter = parse_letter(predictions.get(e.question_id, ''))
    if letter is None or OPTIONS.index(letter) >= e.target['num_choices']:
      unparseable += 1  # LLaVA: FAILED / out-of-range letters score as wrong
      right.append(False)
    else:
      right.append(letter == e.target['answer'])
  return {'accuracy': 100 * mean(right), 'num_questions': len(examples),
          'unparseable': unparseable}
