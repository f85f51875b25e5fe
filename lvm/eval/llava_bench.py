"""LLaVA-Bench (In-the-Wild): free-form answers saved for an external GPT-4 judge.

No score is computed here: the published number (65.4 for LLaVA-1.5 7B) is GPT-4's rating
of each answer relative to its own reference answer, which needs the OpenAI API.
`python -m lvm.evaluate --benchmark=llava_bench` writes the answers and reports counts only.

Layout (under --data_dir, the Hugging Face release liuhaotian/llava-bench-in-the-wild):
`questions.jsonl` ({question_id, image, text, category}), images `images/<image>` (or
directly in data_dir); `context.jsonl` and `answers_gpt4.jsonl` are the judge's inputs.

Prompt (haotian-liu/LLaVA scripts/v1_5/eval/llavabench.sh -> llava/eval/model_vqa.py):
the question text as is, no suffix; greedy, up to 1024 new tokens.

Output `llava_bench_answers.jsonl`: one line per question, in questions.jsonl order, in
model_vqa.py's answer format {question_id, prompt, text, answer_id, model_id, metadata},
which is what llava/eval/eval_gpt_review_bench.py reads as its second answer file (it
zips questions and both answer files line by line, so the order and count must match; a
question that could not be answered gets text ''). Then, in a LLaVA checkout:

  python llava/eval/eval_gpt_review_bench.py --question DATA/questions.jsonl \\
      --context DATA/context.jsonl --rule llava/eval/table/rule.json \\
      --answer-list DATA/answers_gpt4.jsonl OUT/llava_bench_answers.jsonl \\
      --output OUT/reviews.jsonl
  python llava/eval/summarize_gpt_review.py -f OUT/reviews.jsonl
"""

import os

from lvm import registry
from lvm.eval.base import Benchmark, Example, Issues, find_file, image_path, read_jsonl


def load(data_dir: str, split: str | None = None, issues: Issues | None = None):
  del split
  issues = issues if issues is not None else Issues()
  rows = read_jsonl(find_file(data_dir, 'questions.jsonl', what='LLaVA-Bench questions.jsonl'),
                    issues)
  examples = []
  for q in rows:
    try:
      examples.append(Example(
          question_id=q['question_id'], prompt=q['text'],
          image=image_path(data_dir, os.path.join('images', q['image']), q['image']),
          target={'category': q.get('category', 'unknown')}, answered=False))
    except (KeyError, TypeError) as e:
      issues.add('malformed_question', f'{q!r:.150}: {e!r}')
  return examples


def submission(examples, predictions, split, data_dir=None):
  del split, data_dir
  return 'llava_bench_answers.jsonl', [
      {'question_id': e.question_id, 'prompt': e.prompt,
       'text': predictions.get(e.question_id, ''), 'answer_id': f'lvm-{e.question_id}',
       'model_id': 'lvm', 'metadata': {}} for e in examples]


registry.BENCHMARK.register('llava_bench', Benchmark(
    'llava_bench', lambda d, c=None, split=None, issues=None: load(d, split, issues),
    score=lambda examples, predictions, config=None: {},  # every question is for the judge
    headline=lambda s: ('judged_externally', 0.0), max_new_tokens=1024,
    submission=submission))
