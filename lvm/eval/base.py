"""What every benchmark shares: an Example, LLaVA-1.5's prompt suffixes, file lookup."""

import dataclasses
import glob
import os
from typing import Any

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
  """
  question_id: Any
  prompt: str
  image: str | None
  target: dict


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
