"""VQAv2: the official answer normalization and the 10-human soft accuracy (also TextVQA's,
VizWiz's).

`normalize` is the EvalAI answer processor (lower case, punctuation, number words to
digits, articles dropped, contractions restored) that LLaVA applies to its answers before
submission and that TextVQA's evaluator applies to both sides. `vqav2_accuracy` is the
official VQA evaluation on the normalized answer, `textvqa_accuracy` the M4C evaluator's:
with ten human answers, an answer scores min(#matching humans / 3, 1) averaged over the
ten subsets of nine humans (leave one out).

Layout (under --data_dir, the official files; `--split` picks them, default val2014):
  `v2_OpenEnded_mscoco_<split>_questions.json` ({'questions': [{question_id, image_id,
  question}]}), `v2_mscoco_<split>_annotations.json` ({'annotations': [{question_id,
  answers: [{answer}]x10}]}; none for test-dev2015 / test2015, whose answers are written for
  EvalAI instead), images `<split>/COCO_<split>_<image_id:012d>.jpg` (test-dev uses
  test2015/), or that file name directly in data_dir or data_dir/images.
TextVQA (same accuracy): lvm/eval/textvqa.py.
"""

import glob
import os
import re

from lvm.eval.base import (Example, Issues, find_file, image_path, mean, read_json,
                           short_answer_prompt)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
              'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')  # a period not inside a number
COMMA_STRIP = re.compile(r'(?<=\d)(\,)+(?=\d)')  # a thousands separator
PUNCTUATIONS = (';', r'/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>',
                '<', '@', '`', ',', '?', '!')


def process_punctuation(text: str) -> str:
  out = text
  for p in PUNCTUATIONS:
    # As the official code: a mark touching a space (or any text with a digit,digit) is
    # deleted, otherwise it becomes a space ("black-and-white" -> "black and white").
    if (p + ' ' in text or ' ' + p in text) or COMMA_STRIP.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return PERIOD_STRIP.sub('', out)


def process_digit_article(text: str) -> str:
  words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words)


def normalize(answer: str) -> str:
  """The EvalAI answer processor: 'Two dogs.' -> '2 dogs', 'The cat' -> 'cat'."""
  answer = answer.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(answer))


def leave_one_out_accuracy(answer: str, humans: list[str]) -> float:
  """Mean over the leave-one-out subsets of min(#humans in the subset saying answer / 3, 1)."""
  if not humans:
    raise ValueError('A VQA question needs its human answers')
  accs = []
  for i in range(len(humans)):
    matches = sum(1 for j, h in enumerate(humans) if j != i and h == answer)
    accs.append(min(1.0, matches / 3))
  return sum(accs) / len(accs)


def vqav2_accuracy(prediction: str, humans: list[str]) -> float:
  """The official VQAv2 accuracy of one raw prediction against its human answers.

  The prediction is normalized (as LLaVA does before submitting); the official evaluator
  then normalizes again, and punctuates the human answers, only when they disagree.
  """
  pred = normalize(prediction).replace('\n', ' ').replace('\t', ' ').strip()
  if len(set(humans)) > 1:
    humans = [process_punctuation(h) for h in humans]
    pred = process_digit_article(process_punctuation(pred))
  return leave_one_out_accuracy(pred, humans)


def textvqa_accuracy(prediction: str, humans: list[str]) -> float:
  """The TextVQA (M4C evaluator) accuracy: both sides normalized."""
  return leave_one_out_accuracy(normalize(prediction), [normalize(h) for h in humans])


VQAV2_SPLITS = ('val2014', 'test-dev2015', 'test2015')


def _coco_image(data_dir, split, image_id):
  name = f'COCO_{split}_{int(image_id):012d}.jpg'
  return image_path(data_dir, os.path.join(split, name), name, os.path.join('images', name))


def _questions(data_dir: str, split: str) -> list[dict]:
  path = find_file(data_dir, f'*_{split}_questions.json', what=f'VQAv2 {split} questions JSON')
  return read_json(path, 'VQAv2 questions')['questions']


def load_vqav2(data_dir: str, split: str | None = None, issues: Issues | None = None):
  """The questions of `split`; those without an annotation (test-dev) have answered=False.

  Files: `v2_OpenEnded_mscoco_<split>_questions.json` and, for val2014,
  `v2_mscoco_<split>_annotations.json` (a split without one is answered for submission).
  """
  split = split or VQAV2_SPLITS[0]
  questions = _questions(data_dir, split)
  answers = {}
  if glob.glob(os.path.join(data_dir, '**', f'*_{split}_annotations.json'), recursive=True):
    path = find_file(data_dir, f'*_{split}_annotations.json')
    answers = {a['question_id']: [x['answer'] for x in a['answers']]
               for a in read_json(path, 'VQAv2 annotations')['annotations']}
  image_split = split.replace('test-dev', 'test')  # test-dev images live in test2015/
  examples = []
  for q in questions:
    try:
      qid, image = q['question_id'], _coco_image(data_dir, image_split, q['image_id'])
      prompt = short_answer_prompt(q['question'])
    except (KeyError, TypeError, ValueError) as e:
      if issues is None:
        raise
      issues.add('malformed_question', f'{q!r:.150}: {e!r}')
      continue
    examples.append(Example(question_id=qid, prompt=prompt, image=image,
                            target={'answers': answers.get(qid, [])},
                            answered=qid in answers))
  return examples


def score_vqav2(examples, predictions):
  accs = [vqav2_accuracy(predictions.get(e.question_id, ''), e.target['answers'])
          for e in examples]
  return {'accuracy': 100 * mean(accs), 'num_questions': len(examples)}


def vqav2_submission(examples, predictions, split, data_dir):
  """EvalAI's VQA results file: [{question_id: int, answer: str}] (visualqa.org/evaluation;
  LLaVA's scripts/convert_vqav2_for_submission.py), answers EvalAI-normalized.

  Written for splits without local answers. For test-dev2015, as LLaVA does, every
  question of test2015 is listed (the server expects the full set) and those outside
  test-dev get '' when `v2_OpenEnded_mscoco_test2015_questions.json` is present.
  """
  if all(e.answered for e in examples):
    return None
  rows = [{'question_id': e.question_id, 'answer': normalize(predictions.get(e.question_id, ''))}
          for e in examples]
  if split == 'test-dev2015':
    try:
      asked = {e.question_id for e in examples}
      rows += [{'question_id': q['question_id'], 'answer': ''}
               for q in _questions(data_dir, 'test2015') if q['question_id'] not in asked]
    except FileNotFoundError:
      pass  # test-dev questions only
  return f'vqav2_{split}_submission.json', rows
