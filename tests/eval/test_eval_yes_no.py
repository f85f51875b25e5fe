"""POPE and MME yes/no parsing and metrics, on fixtures in the official layouts."""

import json

import pytest

from lvm.eval import mme, pope


@pytest.mark.parametrize('text, label', [
    ('Yes', 'yes'), ('Yes, there is a dog.', 'yes'), ('No.', 'no'), ('no, there is none', 'no'),
    ('There is not a cat', 'no'), ('Nope', 'yes'),  # POPE's word rule: "Nope" is not "No"
    ('Yes. No dog is absent.', 'yes'),  # only the first sentence counts
    ('', 'yes'),
])
def test_pope_to_yes_no(text, label):
  assert pope.to_yes_no(text) == label


def test_pope_metrics_hand_computed():
  m = pope.metrics(['yes', 'yes', 'no', 'no', 'yes'], ['yes', 'no', 'yes', 'no', 'yes'])
  # TP 2, FN 1, FP 1, TN 1.
  assert (m['tp'], m['fn'], m['fp'], m['tn']) == (2, 1, 1, 1)
  assert m['accuracy'] == pytest.approx(60.0)
  assert m['precision'] == pytest.approx(200 / 3)
  assert m['recall'] == pytest.approx(200 / 3)
  assert m['f1'] == pytest.approx(200 / 3)
  assert m['yes_ratio'] == pytest.approx(60.0)
  none = pope.metrics(['yes', 'no'], ['no', 'no'])  # no positive predictions: no 0/0
  assert none['precision'] == 0.0 and none['f1'] == 0.0 and none['accuracy'] == 50.0


def test_pope_fixture_scores(tmp_path):
  lines = lambda rows: '\n'.join(json.dumps(r) for r in rows) + '\n'
  q = lambda i, label: {'question_id': i, 'image': f'COCO_val2014_{i:012d}.jpg',
                        'text': f'Is there a thing {i} in the image?', 'label': label}
  (tmp_path / 'coco_pope_random.json').write_text(lines([q(1, 'yes'), q(2, 'no')]))
  (tmp_path / 'coco_pope_popular.json').write_text(lines([q(1, 'yes'), q(2, 'no')]))
  examples = pope.load(str(tmp_path))
  assert [e.question_id for e in examples] == ['popular/1', 'popular/2', 'random/1', 'random/2']
  assert examples[0].image == str(tmp_path / 'val2014' / 'COCO_val2014_000000000001.jpg')
  scores = pope.score(examples, {'popular/1': 'Yes', 'popular/2': 'No',
                                 'random/1': 'Yes', 'random/2': 'Yes'})
  assert scores['popular']['accuracy'] == 100.0 and scores['popular']['f1'] == 100.0
  assert scores['random']['accuracy'] == 50.0 and scores['random']['yes_ratio'] == 100.0
  assert scores['random']['f1'] == pytest.approx(100 * 2 * 0.5 / 1.5)
  assert scores['f1_mean'] == pytest.approx((100 + 200 / 3) / 2)
  (tmp_path / 'coco_pope_adversarial.json').write_text(lines([dict(q(1, 'yes'), label='maybe')]))
  with pytest.raises(ValueError, match='label'):
    pope.load(str(tmp_path))


@pytest.mark.parametrize('text, label', [
    ('Yes', 'yes'), ('no', 'no'), ('No, it is not', 'no'), ('yes.', 'yes'),
    ('The answer is yes', 'other'),  # only the first four characters are looked at
    ('nope', 'no'), ('', 'other'),
])
def test_mme_parse(text, label):
  assert mme.parse_yes_no(text) == label


def test_mme_fixture_scores(tmp_path):
  # existence: images and questions side by side; artwork: images/ + questions_answers_YN/.
  ex = tmp_path / 'existence'
  ex.mkdir()
  (ex / 'a.txt').write_text('Is there a dog? Please answer yes or no.\tYes\n'
                            'Is there a cat? Please answer yes or no.\tNo\n')
  (ex / 'b.txt').write_text('Is there a car?\tYes\nIs there a bus?\tNo\n')
  (ex / 'a.jpg').write_bytes(b'')
  art = tmp_path / 'artwork'
  (art / 'questions_answers_YN').mkdir(parents=True)
  (art / 'images').mkdir()
  (art / 'questions_answers_YN' / '1.txt').write_text('Is it by Monet?\tYes\nBy Dali?\tNo\n')
  code = tmp_path / 'code_reasoning'
  code.mkdir()
  (code / 'c.txt').write_text('Does it print 3?\tYes\nDoes it print 4?\tNo\n')
  examples = mme.load(str(tmp_path))
  assert len(examples) == 8
  assert examples[0].image == str(ex / 'a.jpg')
  assert examples[0].prompt == ('Is there a dog? Please answer yes or no.\n'
                                'Answer the question using a single word or phrase.')
  assert [e.image for e in examples if e.target['category'] == 'artwork'][0] == str(
      art / 'images' / '1.png')
  preds = {'existence/a.jpg/0': 'Yes', 'existence/a.jpg/1': 'No',  # image a: both right
           'existence/b.png/0': 'Yes', 'existence/b.png/1': 'Yes',  # image b: one right
           'artwork/1.png/0': 'yes', 'artwork/1.png/1': 'no',
           'code_reasoning/c.png/0': 'The answer is yes', 'code_reasoning/c.png/1': 'No'}
  scores = mme.score(examples, preds)
  cats = scores['categories']
  assert cats['existence']['acc'] == 75.0 and cats['existence']['acc_plus'] == 50.0
  assert cats['existence']['score'] == 125.0
  assert cats['artwork']['score'] == 200.0
  assert cats['code_reasoning']['acc'] == 50.0 and cats['code_reasoning']['acc_plus'] == 0.0
  assert scores['perception'] == 325.0 and scores['cognition'] == 50.0


def test_mme_bad_line_is_a_clear_error(tmp_path):
  (tmp_path / 'count').mkdir()
  (tmp_path / 'count' / 'x.txt').write_text('How many? no tab here\n')
  with pytest.raises(ValueError, match='question<TAB>Yes'):
    mme.load(str(tmp_path))
