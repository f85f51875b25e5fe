"""`python -m lvm.generate` (one question, --chat) and the shapes benchmark on a saved run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from configs import tiny
from lvm import checkpoint
from lvm import evaluate
from lvm import inference
from lvm.data import images
from lvm import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run folder with a checkpoint of random tiny weights and a tiny shapes dataset."""
  root = tmp_path_factory.mktemp('gen_cli')
  config = tiny.get_config()
  config.data.data_dir = str(root / 'data')
  config.data.shapes.train, config.data.shapes.validation, config.data.shapes.test = 96, 8, 8
  config.data.shapes.image_size = 32
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.prepare_assets(config)  # the tokenizer and baseline; the TFDS records are not needed
  model = models.build(config)
  h = config.model.vision.image_size
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1, h, h, 3)),
                               jnp.zeros((1, 8), jnp.int32))['params'])
  ckpt = checkpoint.Checkpointer(str(root / 'run'), config.checkpoint)
  ckpt.save(1, {'params': params}, {}, config)
  ckpt.wait()
  ckpt.close()
  scene = [tuple(o) for o in json.loads(next(shapes.examples(shapes.settings(config),
                                                             'test'))[1]['scene'])]
  shapes.draw(scene, 32).save(root / 'shape.png')
  return root


def test_chat_cli_answers_every_turn(workdir):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  cmd = [sys.executable, '-m', 'lvm.generate', f'--workdir={workdir / "run"}',
         f'--image={workdir / "shape.png"}', '--chat', '--max_new_tokens=4']
  proc = subprocess.run(cmd, input='What color is the circle?\nHow many shapes?\n', text=True,
                        capture_output=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert 'USER: What color is the circle?' in lines
  assert 'USER: How many shapes?' in lines
  answers = [l for l in lines if l.startswith('ASSISTANT:')]
  assert len(answers) == 2


def test_single_answer_matches_library_and_shapes_eval(workdir, tmp_path):
  config, gen, text_gen = inference.from_run(str(workdir / 'run'))
  image = images.load_image(str(workdir / 'shape.png'), config)
  turns = [{'from': 'human', 'value': '<image>\nWhat color is the circle?'}]
  out = text_gen.answer([turns], [image[None]], max_new_tokens=4)[0]
  # The same prompt through the token-level API gives the same tokens.
  ids = text_gen.prompt_ids(turns)
  assert ids[0] == text_gen.tokenizer.bos_id
  raw = gen.generate([ids], [image[None]], 4, stop_ids=text_gen.stop_ids)[0]
  assert raw.tokens == out.tokens
  result = evaluate.run(text_gen, config, 'shapes', '', str(tmp_path), limit=6, batch_size=4,
                        max_new_tokens=4)
  lines = (tmp_path / 'answers.jsonl').read_text().splitlines()
  assert len(lines) == 6 and result['num_questions'] == 6
  saved = json.loads((tmp_path / 'score.json').read_text())
  answers = {json.loads(l)['question_id']: json.loads(l)['answer'] for l in lines}
  examples = evaluate.benchmarks.get('shapes').load('', config)[:6]
  right = sum(answers[e.question_id].strip().rstrip('.').lower() == e.target['answer']
              for e in examples)
  assert saved['scores']['accuracy'] == pytest.approx(100 * right / 6)
