"""VQAv2 and TextVQA: the official answer normalization and the 10-human soft accuracy.

`normalize` is the EvalAI answer processor (lower case, punctuation, number words to
digits, articles dropped, contractions restored) that LLaVA applies to its answers before
submission and that TextVQA's evaluator applies to both sides. `vqav2_accuracy` is the
official VQA evaluation on the normalized answer, `textvqa_accuracy` the M4C evaluator's:
with ten human answers, an answer scores min(#matching humans / 3, 1) averaged over the
ten subsets of nine humans (leave one out).

Layouts (under --data_dir):
  VQAv2: `*questions*.json` ({'questions': [{question_id, image_id, question}]}),
    `*annotations*.json` ({'annotations': [{question_id, answers: [{answer}]x10, ...}]}),
    images `<split>/COCO_<split>_<image_id:012d>.jpg` (split from the questions' file name,
    e.g. val2014), or that file name directly in data_dir or data_dir/images.
  TextVQA: `TextVQA_0.5.1_val.json` ({'data': [{question_id, image_id, question, answers,
    ocr_tokens?}]}) and images `train_images/<image_id>.jpg` (the val split's folder; or
    directly in data_dir or data_dir/images).
"""

import json
import os
import re

from lvm.eval.base import Example, find_file, image_path, mean, short_answer_prompt

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


def _coco_image(data_dir, split, image_id):
  name = f'COCO_{split}_{int(image_id):012d}.jpg'
  return image_path(data_dir, os.path.join(split, name), name, os.path.join('images', name))


def load_vqav2(data_dir: str) -> list[Example]:
  questions_path = find_file(data_dir, '*questions*.json', what='VQAv2 questions JSON')
  annotations_path = find_file(data_dir, '*annotations*.json', what='VQAv2 annotations JSON')
  with open(questions_path) as f:
    questions = json.load(f)['questions']
  with open(annotations_path) as f:
    answers = {a['question_id']: [x['answer'] for x in a['answers']]
               for a in json.load(f)['annotations']}
  match = re.search(r'(train|val|test-dev|test)(\d{4})', os.path.basename(questions_path))
  split = f'{match.group(1)}{match.group(2)}' if match else 'val2014'
  split = split.replace('test-dev', 'test')
  examples = []
  for q in questions:
    if q['question_id'] not in answers:
      continue  # no annotation (test-dev): nothing to score locally
    examples.append(Example(
        question_id=q['question_id'], prompt=short_answer_prompt(q['question']),
        image=_coco_image(data_dir, split, q['image_id']),
        target={'answers': answers[q['question_id']]}))
  return examples


def score_vqav2(examples, predictions):
  accs = [vqav2_accuracy(predictions.get(e.question_id, ''), e.target['answers'])
          for e in examples]
  return {'accuracy': 100 * mean(accs), 'num_questions': len(examples)}


def load_textvqa(data_dir: str) -> list[Example]:
  path = find_file(data_dir, 'TextVQA_*val*.json', what='TextVQA val JSON')
  with open(path) as f:
    data = json.load(f)['data']
  examples = []
  for q in data:
    question = q['question']
    # LLaVA-1.5's TextVQA prompt (llava_textvqa_val_v051_ocr) lists the reference OCR tokens.
    if q.get('ocr_tokens'):
      question += '\nReference OCR token: ' + ', '.join(q['ocr_tokens'])
    name = f"{q['image_id']}.jpg"
    image = image_path(data_dir, os.path.join('train_images', name), name,
                       os.path.join('images', name))
    examples.append(Example(question_id=q['question_id'], prompt=short_answer_prompt(question),
                            image=image, target={'answers': q['answers']}))
  return examples


def score_textvqa(examples, predictions):
  accs = [textvqa_accuracy(predictions.get(e.question_id, ''), e.target['answers'])
          for e in examples]
  return {'accuracy': 100 * mean(accs), 'num_questions': len(examples)}
