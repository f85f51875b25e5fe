"""What every benchmark shares: an Example, LLaVA-1.5's prompt suffixes, file lookup."""

import collections
import dataclasses
import glob
import json
import os
from typing import Any, Callable

# LLaVA-1.5's evaluation prompts (llava/eval/*.sh, the `--single-pred-prompt` and jsonl files).
SHORT_ANSWER = 'Answer the question using a single word or phrase.'
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass
class Example:
  """One benchmark question.

  Attributes:
    question_id: the benchmark's id (unique within the benchmark).
    prompt: the user's text, without the `<image>` marker (the harness adds it).
    image: path of the image file, or None for a text-only question.
    target: whatever the scorer needs (answers, label, category, ...).
    image: a file path, encoded image bytes, a PIL image, or None for a text-only question.
    answered: whether the reference answer is known locally; questions without one (test
      splits) are generated and written in the benchmark's submission format, not scored.
  """
  question_id: Any
  prompt: str
  image: Any
  target: dict
  answered: bool = True


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A registered benchmark (`lvm.registry.BENCHMARK`, looked up by `lvm.eval.get`).

  Attributes:
    load: (data_dir, config, split=None, issues=None) -> [Example]; a row that cannot be
      read is counted in `issues` (an `Issues`) and left out, never raised.
    score: (examples, predictions, config) -> dict, over the answered examples only.
    headline: scores -> (label, value), the number printed first.
    splits: the `--split` values it takes (empty: no split flag); the first is the default.
    submission: (examples, predictions, split) -> (file name, JSON-able) or None: the
      official upload file, written beside score.json when it returns one.
    max_new_tokens: the default generation budget.
  """
  name: str
  load: Callable
  score: Callable
  headline: Callable
  max_new_tokens: int = 16  # short answers; a longer answer would be wrong anyway
  splits: tuple[str, ...] = ()
  submission: Callable | None = None


class Issues:
  """Problems met while loading or answering, counted by reason with a few examples each."""

  def __init__(self, max_examples: int = 3):
    self.counts = collections.Counter()
    self.examples = collections.defaultdict(list)
    self.max_examples = max_examples

  def add(self, reason: str, example: Any):
    self.counts[reason] += 1
    if len(self.examples[reason]) < self.max_examples:
      self.examples[reason].append(str(example)[:300])

  def __len__(self):
    return sum(self.counts.values())


def read_json(path: str, what: str):
  """The JSON in `path`; a malformed file raises a ValueError naming it (not a traceback)."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{what} {path!r} is not valid JSON: {e}') from None


def read_jsonl(path: str, issues: 'Issues | None') -> list[dict]:
  """The objects of a JSON-lines file; a malformed line is counted ('malformed_line')."""
  rows = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        if issues is not None:
          issues.add('malformed_line', f'{os.path.basename(path)}:{n}: {e}')
  return rows


def short_answer_prompt(question: str) -> str:
  return f'{question}\n{SHORT_ANSWER}'


def mean(values) -> float:
  values = list(values)
  return sum(values) / len(values) if values else 0.0


def find_file(data_dir: str, pattern: str, what: str | None = None) -> str:
  """The first file matching `pattern` in data_dir or below it (sorted, shallowest first).

  Raises:
    FileNotFoundError naming what was expected where, when nothing matches.
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'--data_dir {data_dir!r} is not a folder')
  matches = sorted(glob.glob(os.path.join(data_dir, '**', pattern), recursive=True),
                   key=lambda p: (p.count(os.sep), p))
  if not matches:
    raise FileNotFoundError(f'No {what or pattern} ({pattern!r}) under {data_dir!r}')
  return matches[0]


def image_path(data_dir: str, *candidates: str) -> str:
  """The first candidate (relative to data_dir) that exists, else the first one.

  A missing image is not an error here: the harness counts it and scores the question
  as unanswered.
  """
  paths = [os.path.join(data_dir, c) for c in candidates]
  return next((p for p in paths if os.path.exists(p)), paths[0])
