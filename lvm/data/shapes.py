"""`shapes`: a synthetic, deterministic, learnable visual question answering dataset.

Each image shows one to four shapes (all of different kinds and colours) in the cells of a
3x3 grid. Each sample has a caption (for stage-1 alignment) and a few question/answer turns
that need the image: the colour of a shape, which shape has a colour, how many shapes, where a
shape is, and yes/no existence. Splits are generated in the order test, validation, train and a
scene already used by an earlier split is never reused, so the splits share no image.

`blind_baseline` gives the accuracy of the best image-blind answerer of this kind (the majority
answer of each question type in train), written at prepare time to `baseline.json`.
"""

import dataclasses
import io
import json
import logging
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from lvm import registry
from lvm.data import records
from lvm.data import family_templates
from lvm.data import templates

SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLOURS = {
    'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
    'yellow': (235, 200, 40), 'purple': (140, 60, 180), 'orange': (245, 130, 30),
}
POSITIONS = ('top left', 'top', 'top right', 'left', 'center', 'right',
             'bottom left', 'bottom', 'bottom right')
NUMBERS = ('zero', 'one', 'two', 'three', 'four')
QUESTION_TYPES = ('colour', 'shape', 'count', 'position', 'exists')
CAPTION_ORDERS = ('shape', 'color')
SPLITS = ('test', 'validation', 'train')  # Generation order: later splits avoid earlier scenes.
_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}
_BACKGROUND = (250, 250, 250)
# Bump when the generated data changes: datasets and tokenizers are cached by version.
GENERATOR_VERSION = '1.5.0'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a shapes dataset is made of; every field is in the TFDS config name."""
  train: int = 20000
  validation: int = 1000
  test: int = 1000
  seed: int = 0
  image_size: int = 64
  turns: int = 3
  # Above 1, each scene's image gets an aspect ratio (width / height) drawn log-uniformly in
  # [1 / max_aspect, max_aspect], its long side `image_size` (for anyres training, whose
  # tiling depends on it); 1: square images, as always before.
  max_aspect: float = 1.0

  @property
  def name(self):
    aspect = f'_a{self.max_aspect:g}' if self.max_aspect != 1 else ''
    return (f'n{self.train}-{self.validation}-{self.test}_s{self.seed}_px{self.image_size}'
            f'_t{self.turns}{aspect}')

  def size(self, split):
    return getattr(self, split)


def config_defaults() -> dict:
  """`config.data.shapes`: the `Settings` fields, and the SentencePiece vocab size (0 = just
  under the image/pad ids, min(image_token_id, pad_token_id, 512), so the ids fit below them)."""
  return dict(dataclasses.asdict(Settings()), vocab_size=0)


def check_config(config, problems: registry.Problems):
  """Faults of `config.data.shapes` (runs when `config.data.dataset='shapes'`)."""
  s = config.data.shapes
  for key in ('train', 'image_size'):
    if not isinstance(s[key], int) or s[key] < 1:
      problems.add(f'data.shapes.{key}', f'must be a positive integer, got {s[key]!r}',
                   'set a positive integer')
  for key in ('validation', 'test', 'vocab_size'):
    if not isinstance(s[key], int) or s[key] < 0:
      problems.add(f'data.shapes.{key}', f'must be an integer >= 0, got {s[key]!r}',
                   'use 0 or more')
  if not isinstance(s.turns, int) or not 1 <= s.turns <= len(QUESTION_TYPES):
    problems.add('data.shapes.turns', f'must be in [1, {len(QUESTION_TYPES)}], got {s.turns!r}',
                 f'ask 1 to {len(QUESTION_TYPES)} questions (one per question type) per image')
  if not isinstance(s.max_aspect, (int, float)) or not 1 <= s.max_aspect <= 8:
    problems.add('data.shapes.max_aspect', f'must be in [1, 8], got {s.max_aspect!r}',
                 '1 for square images, e.g. 3 for widths 1/3 to 3 times the height')


def settings(config) -> Settings:
  """Settings from `config.data.shapes`."""
  s = config.data.shapes
  return Settings(train=s.train, validation=s.validation, test=s.test, seed=s.seed,
                  image_size=s.image_size, turns=s.turns, max_aspect=float(s.max_aspect))


def vocab_size(config) -> int:
  """SentencePiece vocab: `config.data.shapes.vocab_size`, 0 = just under the image/pad ids."""
  return (config.data.shapes.vocab_size
          or min(config.model.image_token_id, config.model.pad_token_id, 512))


def own_tokenizer(config) -> str:
  """The tokenizer of a run with `config.data.tokenizer=''`: the one `prepare` trains."""
  return tokenizer_path(config)


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def assets_dir(config) -> str:
  return os.path.join(data_dir(config), 'lvm_shapes_assets', settings(config).name,
                      GENERATOR_VERSION)


def family_markers(config) -> tuple[str, ...]:
  """Extra single-token markers for a chatml / gemma / mistral run. Other templates keep the
  demo's original tokenizer (its pieces, and so its documented results, unchanged)."""
  family = config.data.template in ('chatml', 'gemma', 'mistral')
  return family_templates.SPECIALS if family else ()


def tokenizer_path(config) -> str:
  suffix = '_families' if family_markers(config) else ''
  return os.path.join(assets_dir(config), f'tokenizer_v{vocab_size(config)}{suffix}.model')


def baseline_path(config) -> str:
  return os.path.join(assets_dir(config), 'baseline.json')


# --- Scenes ---------------------------------------------------------------------------------

def _scene(rng, image_size):
  n = int(rng.integers(1, 5))
  # permutation()[:n], not choice(replace=False): same distribution, several times faster.
  kinds = rng.permutation(len(SHAPES))[:n]
  colours = rng.permutation(len(COLOURS))[:n]
  cells = rng.permutation(len(POSITIONS))[:n]
  cell = image_size / 3
  objects = []
  for (k, c, p), (u, jx, jy) in zip(zip(kinds, colours, cells), rng.random((n, 3)).tolist()):
    r = (0.30 + 0.12 * u) * cell
    slack = cell / 2 - r
    cx = (p % 3 + 0.5) * cell + (2 * jx - 1) * slack
    cy = (p // 3 + 0.5) * cell + (2 * jy - 1) * slack
    objects.append((SHAPES[k], list(COLOURS)[c], POSITIONS[p], round(cx, 1), round(cy, 1),
                    round(r, 1)))
  return tuple(sorted(objects))


def image_shape(image_size: int, aspect: float) -> tuple[int, int]:
  """(height, width) of a scene's image: long side `image_size`, width / height ~ `aspect`."""
  if aspect >= 1:
    return max(1, round(image_size / aspect)), image_size
  return image_size, max(1, round(image_size * aspect))


def draw(scene, image_size, shape=None) -> Image.Image:
  """Renders a scene (2x supersampled for smooth edges).

  `shape`: (height, width) of the image (default square `image_size`); the 3x3 cells stretch
  with it and each shape keeps its form, scaled by the shorter side.
  """
  s = 2
  h, w = shape or (image_size, image_size)
  sx, sy = w / image_size, h / image_size
  im = Image.new('RGB', (w * s, h * s), _BACKGROUND)
  d = ImageDraw.Draw(im)
  for kind, colour, _, cx, cy, r in scene:
    cx, cy, r = cx * sx * s, cy * sy * s, r * min(sx, sy) * s
    fill = COLOURS[colour]
    if kind == 'circle':
      d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == 'square':
      q = r * 0.85
      d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif kind == 'triangle':
      d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
      d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
  return im.reduce(s)


def _article(word):
  return 'an' if word[0] in 'aeiou' else 'a'


def caption(scene, by='shape') -> str:
  """Names every object, ordered `by` shape (circle, diamond, square, triangle) or colour.

  Each scene's caption is ordered one way or the other (drawn per scene) and says which in its
  first words, so its order is never a guess. Ordered by shape, the next shape is predictable
  from the ones already named, so those captions train only the shape -> colour lookup ("what
  color is the circle?"); ordered by colour, the shape after each colour word must be read off
  the image, the colour -> shape lookup ("which shape is red?"). Adding the colour order took
  the demo from 0.80 to 0.96 test exact match (docs/training.md). Captions in the grid's
  reading order need no lookup and taught it less (position answers 0.97 -> 0.37).
  """
  key = {'shape': lambda o: o, 'color': lambda o: (o[1], o)}[by]
  parts = []
  for kind, colour, pos, *_ in sorted(scene, key=key):
    where = 'in the' if pos == 'center' else 'at the'
    parts.append(f'{_article(colour)} {colour} {kind} {where} {pos}')
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return f'By {by}: {text}.'


_OBJECT_QUESTIONS = ('colour', 'shape', 'position')


def questions(rng, scene, turns) -> tuple[list[str], list[tuple[str, str]]] | None:
  """Question types and (question, answer) pairs about `scene`, or None if it cannot hold them.

  No answer can be read off another turn of the conversation: object questions (colour,
  shape, position) ask about distinct objects, and the yes/no question names a shape and a
  colour no other turn mentions (shapes and colours are unique within a scene). A scene with
  too few objects for the drawn questions is rejected (None) rather than given other
  questions, so that which questions are asked says nothing about the image.
  """
  qtypes = [QUESTION_TYPES[j] for j in rng.permutation(len(QUESTION_TYPES))[:turns]]
  yes = 'exists' in qtypes and rng.random() < 0.5
  if sum(q in _OBJECT_QUESTIONS for q in qtypes) + yes > len(scene):
    return None
  objects = [scene[j] for j in rng.permutation(len(scene))]
  qa, shown_kinds, shown_colours = [], set(), set()
  for qtype in qtypes:
    if qtype in _OBJECT_QUESTIONS:
      kind, colour, pos = objects.pop()[:3]
      shown_kinds.add(kind)
      shown_colours.add(colour)
      qa.append({'colour': (f'What color is the {kind}?', colour),
                 'shape': (f'Which shape is {colour}?', kind),
                 'position': (f'Where is the {kind}?', pos)}[qtype])
    elif qtype == 'count':
      qa.append(('How many shapes are there?', NUMBERS[len(scene)]))
    else:
      qa.append(None)  # exists: filled once every object question has picked its object.
  if 'exists' in qtypes:
    if yes:
      kind, colour = objects.pop()[:2]
    else:
      present = {(o[1], o[0]) for o in scene}
      pool = [(c, k) for c in COLOURS for k in SHAPES
              if (c, k) not in present and k not in shown_kinds and c not in shown_colours]
      colour, kind = pool[int(rng.integers(len(pool)))]
    qa[qtypes.index('exists')] = (f'Is there {_article(colour)} {colour} {kind}?',
                                  'yes' if yes else 'no')
  return qtypes, qa


def examples(s: Settings, split: str):
  """Yields (key, example) for `split`; deterministic in `s`, disjoint across splits."""
  used = set()
  for sp in SPLITS:
    rng = np.random.default_rng([s.seed, _SPLIT_INDEX[sp]])
    i = 0
    while i < s.size(sp):
      scene = _scene(rng, s.image_size)
      if scene in used:
        continue
      planned = questions(rng, scene, s.turns)
      if planned is None:
        continue
      used.add(scene)
      qtypes, qa = planned
      caption_order = CAPTION_ORDERS[int(rng.integers(len(CAPTION_ORDERS)))]
      # Drawn only when asked for, so that square datasets stay as they were.
      aspect = (float(np.exp(rng.uniform(-1, 1) * np.log(s.max_aspect)))
                if s.max_aspect != 1 else 1.0)
      if sp == split:
        turns = []
        for k, (q, a) in enumerate(qa):
          turns += [{'from': 'human', 'value': ('<image>\n' if k == 0 else '') + q},
                    {'from': 'gpt', 'value': a}]
        yield f'{split}-{i}', {'id': f'{split}-{i}', 'scene': json.dumps(scene),
                               'caption': caption(scene, caption_order), 'conversations': turns,
                               'question_types': qtypes,
                               'shape': image_shape(s.image_size, aspect)}
      i += 1
    if sp == split:
      return


def encode_png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


# --- Baseline and tokenizer -------------------------------------------------------------------

def blind_baseline(train_examples, eval_examples) -> dict:
  """Accuracy of answering each question type with its majority answer in `train_examples`.

  Returns:
    {'per_type': {qtype: {'majority_answer', 'accuracy', 'count'}}, 'overall': accuracy}.
  """
  counts = {}
  for ex in train_examples:
    answers = [t['value'] for t in ex['conversations'] if t['from'] == 'gpt']
    for qtype, a in zip(ex['question_types'], answers):
      counts.setdefault(qtype, {}).setdefault(a, 0)
      counts[qtype][a] += 1
  majority = {q: max(sorted(c), key=c.get) for q, c in counts.items()}
  right, total = {}, {}
  for ex in eval_examples:
    answers = [t['value'] for t in ex['conversations'] if t['from'] == 'gpt']
    for qtype, a in zip(ex['question_types'], answers):
      total[qtype] = total.get(qtype, 0) + 1
      right[qtype] = right.get(qtype, 0) + (a == majority.get(qtype))
  per_type = {q: {'majority_answer': majority.get(q), 'accuracy': right[q] / total[q],
                  'count': total[q]} for q in sorted(total)}
  overall = sum(right.values()) / max(1, sum(total.values()))
  return {'per_type': per_type, 'overall': overall}


def corpus(s: Settings):
  """Training text for the tokenizer: train conversations rendered in every template."""
  for _, ex in examples(s, 'train'):
    turns = ex['conversations']
    qa = [(turns[i]['value'].replace('<image>\n', ''), turns[i + 1]['value'])
          for i in range(0, len(turns), 2)]
    yield ex['caption'] + '\n'
    yield templates.VICUNA_SYSTEM + ' ' + ''.join(
        f'USER: {q} ASSISTANT: {a}' for q, a in qa)
    yield ('<|start_header_id|>system<|end_header_id|>\n\n' + templates.LLAMA3_SYSTEM +
           '<|eot_id|>' + ''.join(
               f'<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>'
               f'<|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>'
               for q, a in qa))


def train_tokenizer(s: Settings, vocab: int, path: str, markers: tuple[str, ...] = ()):
  """Trains the shapes SentencePiece BPE model (unk 0, bos 1, eos 2) into `path`; `markers`
  become single tokens after the Llama-3 ones."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=corpus(s), model_writer=model, vocab_size=vocab, model_type='bpe',
      character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      user_defined_symbols=['\n'] + list(templates.LLAMA3_SPECIALS[1:]) + [
          '<|begin_of_text|>'] + list(markers),
      normalization_rule_name='identity', remove_extra_whitespaces=False,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, path)


def prepare_assets(config):
  """Trains the tokenizer and writes the blind baseline if missing; returns the baseline."""
  s = settings(config)
  tok_path = tokenizer_path(config)
  if not os.path.exists(tok_path):
    train_tokenizer(s, vocab_size(config), tok_path, family_markers(config))
    logging.info('shapes: trained tokenizer %s', tok_path)
  path = baseline_path(config)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  train = [ex for _, ex in examples(s, 'train')]
  baseline = {split: blind_baseline(train, (ex for _, ex in examples(s, split)))
              for split in ('validation', 'test')}
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(baseline, f, indent=1)
  os.replace(tmp, path)
  return baseline


def load_baseline(config) -> dict:
  """The image-blind majority baseline written by `lvm.data.prepare(config)`."""
  with open(baseline_path(config)) as f:
    return json.load(f)


# --- TFDS builder ----------------------------------------------------------------------------

def builder(config):
  """The TFDS builder of the `shapes` dataset of `config` (not prepared)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  s = settings(config)

  cfg = tfds.core.BuilderConfig(name=s.name, description='shapes settings ' + s.name)

  class LvmShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Synthetic shapes VQA (see lvm/data/shapes.py)."""
    VERSION = tfds.core.Version(GENERATOR_VERSION)
    BUILDER_CONFIGS = [cfg]  # This run's settings: a known config, not a 'custom' one.

    def _info(self):
      return self.dataset_info_from_configs(
          features=records.features(), description=__doc__,
          metadata=tfds.core.MetadataDict(settings=dataclasses.asdict(s)))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      for key, ex in examples(s, split):
        im = draw([tuple(o) for o in json.loads(ex['scene'])], s.image_size, ex['shape'])
        yield key, {'id': ex['id'], 'images': [encode_png(im)],
                    'conversations': json.dumps(ex['conversations']),
                    'caption': ex['caption'],
                    'question_types': json.dumps(ex['question_types'])}

  return LvmShapes(config=cfg.name, data_dir=data_dir(config), file_format='array_record')


def prepare(config):
  """Builds the dataset, the tokenizer and the baseline under `config.data.data_dir`."""
  b = builder(config)
  if not b.is_prepared():
    logging.info('shapes: generating %s into %s', settings(config).name, b.data_dir)
    b.download_and_prepare()
  baseline = prepare_assets(config)
  for split, res in baseline.items():
    per = ', '.join(f'{q} {r["accuracy"]:.3f} ({r["majority_answer"]!r})'
                    for q, r in res['per_type'].items())
    logging.info('shapes %s image-blind majority baseline: overall %.3f; %s', split,
                 res['overall'], per)
  return baseline


def summary(config) -> list[str]:
  """Lines `python -m lvm.data` prints about a prepared dataset: tokenizer and baselines."""
  lines = [f'tokenizer: {tokenizer_path(config)}']
  for split, res in load_baseline(config).items():
    lines.append(f'image-blind majority baseline ({split}): overall {res["overall"]:.3f}')
    for qtype, r in res['per_type'].items():
      lines.append(f'  {qtype:9s} {r["accuracy"]:.3f}  (always {r["majority_answer"]!r})')
  return lines


registry.DATASET.register('shapes', sys.modules[__name__], defaults=config_defaults,
                          check=check_config)
