"""The shapes dataset: determinism, disjoint splits, answers that match the image, baseline."""

import hashlib
import json
import os

import numpy as np
import pytest

from lvm.data import pipeline, shapes, tokenizer
from tests.data.conftest import tiny_shapes_config

S = shapes.Settings(train=60, validation=20, test=20, seed=3, image_size=64, turns=3)


def test_examples_are_deterministic_and_seeded():
  a = [ex for _, ex in shapes.examples(S, 'train')]
  b = [ex for _, ex in shapes.examples(S, 'train')]
  assert a == b and len(a) == 60
  other = shapes.Settings(train=60, validation=20, test=20, seed=4)
  assert [ex['scene'] for _, ex in shapes.examples(other, 'train')] != [ex['scene'] for ex in a]


def test_splits_share_no_scene():
  scenes = {split: {ex['scene'] for _, ex in shapes.examples(S, split)}
            for split in shapes.SPLITS}
  assert scenes['train'].isdisjoint(scenes['test'])
  assert scenes['train'].isdisjoint(scenes['validation'])
  assert scenes['validation'].isdisjoint(scenes['test'])


def test_answers_follow_from_the_scene():
  seen = set()
  for _, ex in shapes.examples(S, 'train'):
    scene = json.loads(ex['scene'])
    by_kind = {o[0]: o for o in scene}
    by_colour = {o[1]: o for o in scene}
    turns = ex['conversations']
    assert turns[0]['value'].startswith('<image>\n')
    assert sum(t['value'].count('<image>') for t in turns) == 1
    for qtype, (q, a) in zip(ex['question_types'], zip(turns[::2], turns[1::2])):
      q, a = q['value'].replace('<image>\n', ''), a['value']
      words = q.rstrip('?').split()
      seen.add(qtype)
      if qtype == 'colour':
        assert by_kind[words[-1]][1] == a
      elif qtype == 'shape':
        assert by_colour[words[-1]][0] == a
      elif qtype == 'count':
        assert shapes.NUMBERS[len(scene)] == a
      elif qtype == 'position':
        assert by_kind[words[-1]][2] == a
      else:
        colour, kind = words[-2], words[-1]
        assert a == ('yes' if kind in by_kind and by_kind[kind][1] == colour else 'no')
    assert len(set(ex['question_types'])) == 3
  assert seen == set(shapes.QUESTION_TYPES)


def test_no_answer_can_be_read_off_another_turn():
  names = set(shapes.SHAPES) | set(shapes.COLOURS)
  for _, ex in shapes.examples(S, 'train'):
    turns = [t['value'].replace('<image>\n', '') for t in ex['conversations']]
    mentioned = []  # words naming a shape or colour, per turn (question and answer)
    for q, a in zip(turns[::2], turns[1::2]):
      mentioned.append({w for w in (q.rstrip('?') + ' ' + a).split() if w in names})
    for i, qtype in enumerate(ex['question_types']):
      others = set().union(*(m for j, m in enumerate(mentioned) if j != i))
      if qtype != 'count':
        # The shape / colour this turn asks about or answers appears in no other turn.
        assert not (mentioned[i] & others), (turns, qtype)


def test_captions_name_every_object_in_the_order_they_say():
  orders = []
  for _, ex in shapes.examples(S, 'train'):
    scene = json.loads(ex['scene'])
    header, text = ex['caption'].rstrip('.').split(': ')
    order = header.removeprefix('By ')
    orders.append(order)
    phrases = [p.split() for p in text.replace(' and ', ', ').split(', ')]
    # "a red circle at the top left": article, colour, kind, 'at'/'in', 'the', position.
    named = [(p[2], p[1], ' '.join(p[5:])) for p in phrases]
    assert sorted(named) == sorted(tuple(o[:3]) for o in scene)
    keys = [n[0] if order == 'shape' else n[1] for n in named]
    assert keys == sorted(keys), ex['caption']
  assert set(orders) == set(shapes.CAPTION_ORDERS)


def test_drawn_colours_match_the_scene():
  for _, ex in list(shapes.examples(S, 'test'))[:10]:
    scene = [tuple(o) for o in json.loads(ex['scene'])]
    pixels = np.asarray(shapes.draw(scene, 64))
    for kind, colour, _, cx, cy, _ in scene:
      # The centre of every shape kind lies inside it.
      got = pixels[int(cy), int(cx)]
      np.testing.assert_allclose(got, shapes.COLOURS[colour], atol=2, err_msg=kind)


def test_blind_baseline_numbers():
  def ex(qtypes, answers):
    turns = []
    for a in answers:
      turns += [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': a}]
    return {'question_types': qtypes, 'conversations': turns}
  train = [ex(['count', 'exists'], ['two', 'yes']), ex(['count', 'exists'], ['two', 'no']),
           ex(['count', 'exists'], ['one', 'no'])]
  test = [ex(['count', 'exists'], ['two', 'yes']), ex(['count', 'exists'], ['three', 'no'])]
  b = shapes.blind_baseline(train, test)
  assert b['per_type']['count'] == {'majority_answer': 'two', 'accuracy': 0.5, 'count': 2}
  assert b['per_type']['exists'] == {'majority_answer': 'no', 'accuracy': 0.5, 'count': 2}
  assert b['overall'] == 0.5


def test_prepared_dataset(shapes_dir):
  config = tiny_shapes_config(shapes_dir)
  assert pipeline.num_examples(config, 'train') == 96
  assert pipeline.num_examples(config, 'validation') == 24
  digests = {}
  for split in shapes.SPLITS:
    src = pipeline.data_source(config, split)
    digests[split] = {hashlib.sha1(src[i]['images'][0]).hexdigest() for i in range(len(src))}
  assert digests['train'].isdisjoint(digests['test'] | digests['validation'])
  baseline = shapes.load_baseline(config)
  for split in ('validation', 'test'):
    assert set(baseline[split]['per_type']) == set(shapes.QUESTION_TYPES)
    assert 0.1 < baseline[split]['overall'] < 0.5
  # Idempotent: a second prepare rebuilds nothing.
  tok_path = shapes.tokenizer_path(config)
  mtime = os.path.getmtime(tok_path)
  from lvm import data  # pylint: disable=g-import-not-at-top
  data.prepare(config)
  assert os.path.getmtime(tok_path) == mtime


def test_tokenizer_fits_the_tiny_model(shapes_dir):
  config = tiny_shapes_config(shapes_dir)
  tok = tokenizer.load(config)
  assert tok.vocab_size <= 510 and (tok.image_token_id, tok.pad_id) == (510, 511)
  ids = tok.encode('What color is the circle? ASSISTANT: red')
  assert max(ids) < 510 and 0 not in ids  # No unknown pieces in the dataset's own text.
  assert tok.decode(ids) == 'What color is the circle? ASSISTANT: red'
  bad = tiny_shapes_config(shapes_dir, **{'shapes.vocab_size': 510})
  bad.model.image_token_id = 100
  with pytest.raises(ValueError, match='image_token_id=100'):
    tokenizer.load(bad)
  bad = tiny_shapes_config(shapes_dir)
  bad.model.decoder.vocab_size = 511
  with pytest.raises(ValueError, match='pad_token_id=511'):
    tokenizer.load(bad)
