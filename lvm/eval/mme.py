"""MME: yes/no questions, two per image, in 10 perception and 4 cognition categories.

Layout (under --data_dir, the MME_Benchmark_release_version folder): one folder per
category. artwork, celebrity, landmark, posters and scene keep images in `images/` and
question files in `questions_answers_YN/`; the others keep `<name>.png|jpg` and `<name>.txt`
side by side. A question file has one "question<TAB>Yes|No" per line.

Scoring (MME's calculation.py): an answer is "yes"/"no" if it is exactly that (lower case),
else "yes" or "no" if its first four characters contain it (yes first), else "other"
(wrong). Per category: acc = % of questions right, acc+ = % of images with both questions
right, score = acc + acc+. Perception and cognition totals sum their categories' scores.
"""

import collections
import glob
import os

from lvm.eval.base import Example, mean, short_answer_prompt

PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene',
              'landmark', 'artwork', 'OCR')
COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation',
             'code_reasoning')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def parse_yes_no(prediction: str) -> str:
  text = prediction.lower().strip()
  if text in ('yes', 'no'):
    return text
  prefix = text[:4]
  if 'yes' in prefix:
    return 'yes'
  if 'no' in prefix:
    return 'no'
  return 'other'


def _pairs(folder):
  """(question file, image path) pairs of one category folder."""
  qa_dir = os.path.join(folder, 'questions_answers_YN')
  if os.path.isdir(qa_dir):
    image_dir = os.path.join(folder, 'images')
    txts = sorted(glob.glob(os.path.join(qa_dir, '*.txt')))
  else:
    image_dir = folder
    txts = sorted(glob.glob(os.path.join(folder, '*.txt')))
  for txt in txts:
    stem = os.path.splitext(os.path.basename(txt))[0]
    images = [os.path.join(image_dir, stem + e) for e in IMAGE_EXTENSIONS]
    yield txt, next((p for p in images if os.path.exists(p)), images[0])


def load(data_dir: str) -> list[Example]:
  examples = []
  for category in PERCEPTION + COGNITION:
    folder = os.path.join(data_dir, category)
    if not os.path.isdir(folder):
      continue
    for txt, image in _pairs(folder):
      with open(txt, encoding='utf-8') as f:
        lines = [l.rstrip('\n') for l in f if l.strip()]
      for i, line in enumerate(lines):
        question, sep, answer = line.partition('\t')
        answer = answer.strip().lower()
        if not sep or answer not in ('yes', 'no'):
          raise ValueError(f'{txt}:{i + 1}: expected "question<TAB>Yes|No", got {line!r}')
        image_key = os.path.basename(image)
        examples.append(Example(
            question_id=f'{category}/{image_key}/{i}', prompt=short_answer_prompt(question),
            image=image, target={'category': category, 'image': image_key, 'answer': answer}))
  if not examples:
    raise FileNotFoundError(f'No MME category folders ({", ".join(PERCEPTION + COGNITION)}) '
                            f'under {data_dir!r}')
  return examples


def score(examples, predictions):
  per_category = collections.defaultdict(lambda: collections.defaultdict(list))
  for e in examples:
    right = parse_yes_no(predictions.get(e.question_id, '')) == e.target['answer']
    per_category[e.target['category']][e.target['image']].append(right)
  result = {}
  for category, images in per_category.items():
    acc = 100 * mean(r for rights in images.values() for r in rights)
    acc_plus = 100 * mean(all(rights) for rights in images.values())
    result[category] = {'acc': acc, 'acc_plus': acc_plus, 'score': acc + acc_plus,
                        'num_questions': sum(map(len, images.values()))}
  return {'perception': sum(result[c]['score'] for c in PERCEPTION if c in result),
          'cognition': sum(result[c]['score'] for c in COGNITION if c in result),
          'categories': result}
