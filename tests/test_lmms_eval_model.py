"""lvm as an lmms-eval model, end to end through lmms-eval's own evaluator, offline.

A tiny random run, a local dataset (saved with `datasets`) and two local task YAMLs (one
generate_until, one multiple_choice) go through `lmms_eval.evaluator.simple_evaluate`
with `--model lvm` resolved by name (the `lmms_eval.models` entry point of setup.cfg).
The adapter's answers must equal lvm's own TextGenerator's, its log-likelihoods a direct
unpadded forward pass, and the task's accuracy the argmin of those. Skipped unless the
`[eval]` extra (lmms-eval) is installed.
"""

import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # nothing may be downloaded
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # pylint: disable=g-import-not-at-top

pytest.importorskip('lmms_eval')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from configs import tiny  # pylint: disable=g-import-not-at-top
from lvm import checkpoint, inference, models  # pylint: disable=g-import-not-at-top
from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
from lvm.data import templates  # pylint: disable=g-import-not-at-top
from lvm.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

# (question, image size or None for a text-only doc, choices, label)
DOCS = [('What color is the circle?', (40, 24), ['red', 'blue', 'green'], 0),
        ('Is there a square?', None, ['yes', 'no'], 1),
        ('Where is the triangle?', (20, 48), ['left', 'right'], 1)]
MAX_NEW_TOKENS = 6
UNTIL = ['USER']  # a stop string of the task, cut on the host (the random model says it)

GEN_TASK = """\
task: lvm_local_gen
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: {until}
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """\
task: lvm_local_mc
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
"""

UTILS = """\
def doc_to_visual(doc):
  return [] if doc['image'] is None else [doc['image'].convert('RGB')]


def doc_to_choice(doc):
  return doc['choices']
"""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A run with random tiny weights; the local dataset and task folder."""
  import datasets  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('lmms')
  config = tiny.get_config()
  config.data.data_dir = str(root / 'data')
  # Few shapes examples: the tokenizer's corpus is small and quick to train.
  config.data.shapes.train, config.data.shapes.validation, config.data.shapes.test = 96, 8, 8
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.prepare_assets(config)  # the run's tokenizer
  model = models.build(config)
  h = config.model.vision.image_size
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, h, h, 3)),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  ckpt = checkpoint.Checkpointer(str(root / 'run'), config.checkpoint)
  ckpt.save(1, {'params': params}, {}, config)
  ckpt.wait()
  ckpt.close()
  rng = np.random.default_rng(0)
  pictures = [None if size is None else
              Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
              for _, size, _, _ in DOCS]
  features = datasets.Features({'question': datasets.Value('string'),
                                'image': datasets.Image(),
                                'choices': datasets.Sequence(datasets.Value('string')),
                                'label': datasets.Value('int32'),
                                'answer': datasets.Value('string')})
  table = datasets.Dataset.from_dict(
      {'question': [d[0] for d in DOCS], 'image': pictures, 'choices': [d[2] for d in DOCS],
       'label': [d[3] for d in DOCS], 'answer': [d[2][d[3]] for d in DOCS]},
      features=features)
  datasets.DatasetDict({'test': table}).save_to_disk(str(root / 'dataset'))
  tasks = root / 'tasks'
  tasks.mkdir()
  (tasks / 'utils.py').write_text(UTILS)
  fields = dict(data=root / 'dataset', until=UNTIL, max_new_tokens=MAX_NEW_TOKENS)
  (tasks / 'lvm_local_gen.yaml').write_text(GEN_TASK.format(**fields))
  (tasks / 'lvm_local_mc.yaml').write_text(MC_TASK.format(**fields))
  return root, params, pictures


def _image(config, picture):
  return None if picture is None else images_lib.load_image(picture, config)[None]


def _human(question, picture):
  return {'from': 'human', 'value': ('' if picture is None else '<image>\n') + question}


def test_lmms_eval_scores_a_local_task_with_lvm_answers(setup):
  from lmms_eval import evaluator  # pylint: disable=g-import-not-at-top
  from lmms_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  root, params, pictures = setup
  manager = TaskManager('ERROR', include_path=str(root / 'tasks'), include_defaults=False)
  out = evaluator.simple_evaluate(
      model='lvm', model_args=f'workdir={root / "run"}', tasks=['lvm_local_gen', 'lvm_local_mc'],
      batch_size=2, task_manager=manager, log_samples=True, verbosity='ERROR')
  samples = {name: sorted(rows, key=lambda s: s['doc_id'])
             for name, rows in out['samples'].items()}

  # generate_until: lvm's own TextGenerator, all questions in one batch, gives the same.
  config, gen, text_gen = inference.from_run(str(root / 'run'))
  own = text_gen.answer([[_human(d[0], p)] for d, p in zip(DOCS, pictures)],
                        [_image(config, p) for p in pictures], MAX_NEW_TOKENS, SamplingParams())
  cut = [inference.cut_at_stop_strings(o.text, UNTIL)[0] for o in own]
  assert [s['resps'] for s in samples['lvm_local_gen']] == [[[c]] for c in cut]
  assert all(c for c in cut) and any(c != o.text for c, o in zip(cut, own))  # `until` applied

  # loglikelihood: a direct, unpadded forward pass of each (question, choice) alone.
  model = models.build(config)
  forward = jax.jit(lambda images, ids: model.apply({'params': params}, images, ids))
  accuracy = []
  for (question, _, choices, label), picture, sample in zip(DOCS, pictures,
                                                           samples['lvm_local_mc']):
    direct = []
    for choice in choices:
      ids, target = templates.render(
          'vicuna_v1', [_human(question, picture), {'from': 'gpt', 'value': ' ' + choice}],
          text_gen.tokenizer, gen.tokens_per_image)
      image = _image(config, picture)
      logits = forward(None if image is None else image[None], jnp.asarray(ids)[None])[0]
      logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
      t = np.flatnonzero(target)  # scored tokens: the answer and its </s>
      nll = -logp[t - 1, ids[t]]
      greedy = bool(np.all(logp[t - 1].argmax(-1) == ids[t]))
      direct.append((float(nll.mean()), greedy))
    got = [tuple(r[0]) for r in sample['resps']]
    np.testing.assert_allclose([g[0] for g in got], [d[0] for d in direct], rtol=2e-5)
    assert [g[1] for g in got] == [d[1] for d in direct]
    accuracy.append(float(np.argmin([d[0] for d in direct]) == label))
  assert out['results']['lvm_local_mc']['acc,none'] == pytest.approx(np.mean(accuracy))


def test_transformers_folder_answers_as_the_run(setup):
  """`--model_args hf=FOLDER`: the run exported with lvm.hf (plus its tokenizer) answers alike."""
  import shutil  # pylint: disable=g-import-not-at-top
  from lvm import hf  # pylint: disable=g-import-not-at-top
  from lvm import lmms_eval_model  # pylint: disable=g-import-not-at-top
  root, params, pictures = setup
  config, _, text_gen = inference.from_run(str(root / 'run'))
  folder = root / 'hf'
  hf.save(config.model, params, str(folder))
  shutil.copy(text_gen.tokenizer.path, folder / 'tokenizer.model')
  adapter = lmms_eval_model.LvmModel(hf=str(folder), dtype='float32', batch_size=4)
  turns = [[_human(d[0], p)] for d, p in zip(DOCS, pictures)]
  ours = adapter.text_gen.answer(turns, [_image(adapter.config, p) for p in pictures],
                                 MAX_NEW_TOKENS, min_batch=4)
  own = text_gen.answer(turns, [_image(config, p) for p in pictures], MAX_NEW_TOKENS,
                        min_batch=4)
  assert [o.tokens for o in ours] == [o.tokens for o in own]
  assert adapter.text_gen.template == 'vicuna_v1'


def test_bad_model_args_are_clear_errors(setup):
  from lvm import lmms_eval_model  # pylint: disable=g-import-not-at-top
  root = setup[0]
  with pytest.raises(ValueError, match='exactly one of model_args workdir'):
    lmms_eval_model.LvmModel()
  with pytest.raises(ValueError, match=r"Unknown lvm model_args \['pretrained'\]"):
    lmms_eval_model.LvmModel(workdir=str(root / 'run'), pretrained='x')
  with pytest.raises(ValueError, match=r"model_args template: .*'vicuna_v9' is not a registered"):
    lmms_eval_model.LvmModel(workdir=str(root / 'run'), template='vicuna_v9')
  with pytest.raises(ValueError, match="model_args image_aspect must be one of"):
    lmms_eval_model.LvmModel(workdir=str(root / 'run'), image_aspect='square')
