"""Bad inputs at inference: a corrupt newest checkpoint, bad images, nothing scorable.

Issue 27 item 8: `lvm.generate`, `lvm.evaluate`, `lvm.hf export` and `init.kind=checkpoint`
(`checkpoint.load_params` with the train state's abstract params) fall back past a corrupt
newest checkpoint as training does, saying so; a step folder named explicitly that does
not restore is an error naming it and the usable steps.
Issue 27 item 12: a missing or non-image `--image` is one line naming the file.
Issue 27 item 11: `lvm.evaluate` exits non-zero when (nearly) nothing could be scored.

The run folder holds two checkpoints of random tiny weights: step 1 (seed 0) and step 2
(seed 1), step 2 then damaged (a state data file truncated to a third), so which step was
restored shows in the numbers.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lvm import checkpoint
from lvm import evaluate
from lvm import inference
from lvm import models
from lvm import sharding as lvm_sharding
import lvm.hf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(config, seed):
  h = config.model.vision.image_size
  return nn.unbox(models.build(config).init(
      jax.random.key(seed), jnp.zeros((1, 1, h, h, 3)), jnp.zeros((1, 8), jnp.int32))['params'])


def _largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, config, step-1 params) with step 2 corrupt."""
  root = tmp_path_factory.mktemp('infer')
  config = tiny.get_config()
  config.data.data_dir = str(root / 'data')
  config.data.shapes.train, config.data.shapes.validation, config.data.shapes.test = 96, 8, 8
  config.data.shapes.image_size = 32
  from lvm.data import shapes  # pylint: disable=g-import-not-at-top
  shapes.prepare_assets(config)  # the tokenizer; the TFDS records are not needed
  workdir = root / 'run'
  ckpt = checkpoint.Checkpointer(str(workdir), config.checkpoint)
  first = _params(config, 0)
  ckpt.save(1, {'params': first}, {}, config)
  ckpt.save(2, {'params': _params(config, 1)}, {}, config)
  ckpt.close()
  victim = _largest_file(workdir / 'checkpoints' / '2' / 'state')
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 3)
  return workdir, config, jax.device_get(first)


def _assert_params_equal(got, want):
  got, want = jax.device_get(got), want
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_params_onto_shardings_falls_back_past_corrupt_newest(run):
  """Item 8, `init.kind=checkpoint`'s call: restored into shardings, from step 1."""
  workdir, config, first = run
  mesh = lvm_sharding.make_mesh(config.mesh)
  target = inference.abstract_params(config, mesh)
  logs = []
  _, params = checkpoint.load_params(str(workdir), target, log=logs.append)
  _assert_params_equal(params, first)
  assert any('checkpoint step 2 is unusable' in l and 'using step 1' in l for l in logs), logs
  leaf, want = params['decoder']['embed_tokens'], target['decoder']['embed_tokens']
  assert leaf.sharding == want.sharding and len(leaf.sharding.device_set) == 8
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']  # inference moves nothing


def test_explicit_corrupt_step_names_it_and_the_usable_ones(run):
  """Item 8: a step folder given explicitly is not silently replaced by another."""
  workdir, _, _ = run
  step2 = workdir / 'checkpoints' / '2'
  with pytest.raises(RuntimeError) as err:
    checkpoint.load_params(str(step2))
  message = str(err.value)
  assert f'Checkpoint {step2} does not restore' in message
  assert f'Other checkpoint steps in {step2.parent}: [1]' in message


def test_hf_export_reads_past_corrupt_newest(run):
  """Item 8: `lvm.hf export`'s reader (`load_converted`) uses step 1."""
  workdir, _, first = run
  logs = []
  _, params = lvm.hf.load_converted(str(workdir), log=logs.append)
  _assert_params_equal(params, first)
  assert logs and 'checkpoint step 2 is unusable' in logs[0]


def test_from_run_restores_sharded_from_the_last_good_step(run):
  """Item 8 and issue 20.6: the generator's params come sharded, from step 1."""
  workdir, _, first = run
  _, gen, _ = inference.from_run(str(workdir), log=lambda _: None)
  _assert_params_equal(gen.params, first)
  got = jax.tree.leaves(gen.params)
  want = jax.tree.leaves(gen.param_shardings)
  assert all(a.sharding == s for a, s in zip(got, want))


def _cli(module, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', module, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_generate_cli_bad_images_and_corrupt_checkpoint(run, tmp_path):
  """Items 12 and 8: bad --image files are named; a corrupt newest step is skipped."""
  workdir, _, _ = run
  text_file = tmp_path / 'notes.txt'
  text_file.write_text('not an image')
  for image, why in ((text_file, 'corrupt_image'), (tmp_path / 'gone.png', 'missing_image')):
    proc = _cli('lvm.generate', f'--workdir={workdir}', f'--image={image}', '--prompt=hi')
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith('Error:')]
    assert len(errors) == 1 and errors[0].startswith(f'Error: --image: {why}: {image}'), errors
    assert 'Traceback' not in proc.stderr
  proc = _cli('lvm.generate', f'--workdir={workdir}', '--prompt=hi', '--max_new_tokens=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint step 2 is unusable' in proc.stdout + proc.stderr
  # orbax's reads of step 2 abandoned when one failed (test_corrupt_checkpoint.py)
  assert 'Exception ignored' not in proc.stderr


def test_evaluate_exits_nonzero_when_nothing_scored(run, tmp_path):
  """Item 11: every image missing -> exit 1 with the reason; score.json still written."""
  workdir, _, _ = run
  data = tmp_path / 'pope'
  (data / 'val2014').mkdir(parents=True)
  (data / 'coco_pope_random.json').write_text(''.join(
      json.dumps({'question_id': i, 'image': f'{i}.jpg', 'text': f'Is there a thing {i}?',
                  'label': 'yes'}) + '\n' for i in (1, 2, 3)))
  out = tmp_path / 'out'
  proc = _cli('lvm.evaluate', f'--workdir={workdir}', '--benchmark=pope', f'--data_dir={data}',
              f'--out_dir={out}')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert '(0 of 3 questions scored, 3 skipped' in proc.stdout
  assert 'Error: only 0 of 3 questions could be scored (skipped: 3 missing_image' in proc.stderr
  score = json.loads((out / 'score.json').read_text())
  assert (score['num_scored'], score['num_questions']) == (0, 3)


def test_too_few_scored_threshold():
  """Item 11: the fraction flag's rule, at and around the threshold."""
  result = {'num_scored': 5, 'num_questions': 10, 'skipped': {'missing_image': 5},
            'data_dir': '/d'}
  assert evaluate.too_few_scored(result, 0.5) is None
  assert 'only 5 of 10 questions' in evaluate.too_few_scored(result, 0.6)
  assert evaluate.too_few_scored(dict(result, num_scored=0), 0.0) is not None
  assert evaluate.too_few_scored(dict(result, num_scored=10, skipped={}), 1.0) is None


def test_one_image_loader_names_the_file(tmp_path):
  """Item 12 and issue 20.6: `images.load_image` (generate and evaluate) on paths, bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lvm.data import images  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  size = config.model.vision.image_size
  Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / 'red.png')
  from_path = images.load_image(str(tmp_path / 'red.png'), config)
  from_bytes = images.load_image((tmp_path / 'red.png').read_bytes(), config)
  np.testing.assert_array_equal(from_path, from_bytes)
  assert from_path.shape == (size, size, 3)
  # 'pad': the red image is centered on the mean colour; its centre is normalized red.
  mean, std = np.asarray(config.data.image_mean), np.asarray(config.data.image_std)
  np.testing.assert_allclose(from_path[size // 2, size // 2], (np.array([1, 0, 0]) - mean) / std,
                             rtol=1e-5)
  (tmp_path / 'notes.txt').write_text('hello')
  cases = {'notes.txt': 'corrupt_image', 'gone.jpg': 'missing_image', '.': 'not_a_file'}
  for name, reason in cases.items():
    with pytest.raises(images.ImageError) as err:
      images.load_image(str(tmp_path / name), config)
    assert err.value.reason == reason
    assert str(err.value).startswith(f'{reason}: {tmp_path / name}'), str(err.value)
