"""TextVQA val with LLaVA-1.5's OCR-token prompt (the published 58.2 uses it).

The reproduction trap: LLaVA's question file `llava_textvqa_val_v051_ocr.jsonl`
(haotian-liu/LLaVA scripts/v1_5/eval/textvqa.sh -> llava/eval/model_vqa_loader.py) puts the
reference OCR tokens in the prompt: "<question>\\nReference OCR token: tok1, tok2, ...\\n
Answer the question using a single word or phrase." (no OCR line when a question has no
tokens). Harnesses that omit them score several points lower; `textvqa_no_ocr` asks
without them, to measure that gap.

Layout (under --data_dir): `TextVQA_0.5.1_val.json` ({'data': [{question_id, image_id,
question, answers x10, ocr_tokens}]}) and images `train_images/<image_id>.jpg` (the val
images ship in train_images; or directly in data_dir or data_dir/images). When LLaVA's
`llava_textvqa_val_v051_ocr.jsonl` ({question_id: image_id, image, text}) is there too, its
prompts are used verbatim and matched to the annotations by (image_id, lower-cased
question) as llava/eval/eval_textvqa.py's `prompt_processor` does; otherwise the same
prompt is built from the annotation's `ocr_tokens`.

Scoring (llava/eval/m4c_evaluator.py TextVQAAccuracyEvaluator): both sides normalized by
the EvalAI processor, min(#matching humans / 3, 1) averaged over the ten leave-one-out
subsets (`vqa.textvqa_accuracy`).
"""

import glob
import os

from lvm import registry
from lvm.eval import vqa
from lvm.eval.base import (SHORT_ANSWER, Benchmark, Example, Issues, find_file, image_path,
                           mean, read_json, read_jsonl)

OCR_PREFIX = 'Reference OCR token: '
LLAVA_QUESTIONS = 'llava_textvqa_val_v051_ocr.jsonl'


def prompt(question: str, ocr_tokens, ocr: bool = True) -> str:
  lines = [question]
  if ocr and ocr_tokens:
    lines.append(OCR_PREFIX + ', '.join(ocr_tokens))
  return '\n'.join(lines + [SHORT_ANSWER])


def question_of(llava_prompt: str) -> str:
  """LLaVA's eval_textvqa.py prompt_processor: the question line, lower-cased."""
  lines = llava_prompt.split('\n')
  if OCR_PREFIX in llava_prompt and len(lines) == 3:
    return (lines[1] if llava_prompt.startswith(OCR_PREFIX) else lines[0]).lower()
  if len(lines) == 2:
    return lines[0].lower()
  raise ValueError(f'not a LLaVA TextVQA prompt: {llava_prompt!r:.120}')


def _image(data_dir, image_id):
  name = f'{image_id}.jpg'
  return image_path(data_dir, os.path.join('train_images', name), name,
                    os.path.join('images', name))


def load(data_dir: str, split: str | None = None, issues: Issues | None = None,
         ocr: bool = True) -> list[Example]:
  del split  # val only (test answers are not public)
  issues = issues if issues is not None else Issues()
  path = find_file(data_dir, 'TextVQA_*val*.json', what='TextVQA val JSON')
  data = read_json(path, 'TextVQA annotations')['data']
  llava = glob.glob(os.path.join(data_dir, '**', LLAVA_QUESTIONS), recursive=True)
  examples = []
  if ocr and llava:
    by_key = {(q['image_id'], q['question'].lower()): q for q in data}
    seen = set()
    for row in read_jsonl(sorted(llava)[0], issues):
      try:
        q = by_key[(row['question_id'], question_of(row['text']))]
      except (KeyError, ValueError) as e:
        issues.add('malformed_question', f'{row!r:.150}: no annotation ({e!r:.80})')
        continue
      if q['question_id'] in seen:  # two rows naming one annotated question
        issues.add('duplicate_question', f'{row!r:.150}')
        continue
      seen.add(q['question_id'])
      examples.append(Example(q['question_id'], row['text'], _image(data_dir, q['image_id']),
                              {'answers': q['answers']}))
    return examples
  for q in data:
    try:
      examples.append(Example(q['question_id'],
                              prompt(q['question'], q.get('ocr_tokens'), ocr),
                              _image(data_dir, q['image_id']), {'answers': q['answers']}))
    except (KeyError, TypeError) as e:
      issues.add('malformed_question', f'{q!r:.150}: {e!r}')
  return examples


def score(examples, predictions, config=None):
  accs = [vqa.textvqa_accuracy(predictions.get(e.question_id, ''), e.target['answers'])
          for e in examples]
  return {'accuracy': 100 * mean(accs), 'num_questions': len(examples)}


for _name, _ocr in (('textvqa', True), ('textvqa_no_ocr', False)):
  registry.BENCHMARK.register(_name, Benchmark(
      _name, lambda d, c=None, split=None, issues=None, _ocr=_ocr: load(d, split, issues, _ocr),
      score, lambda s: ('accuracy', s['accuracy']), splits=('val',)))
