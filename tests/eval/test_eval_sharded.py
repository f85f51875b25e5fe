"""lvm.evaluate.run over meshes and processes: the same answers on 1 device, 8 emulated
devices and 2 local processes (4 devices each), with bad images counted the same way."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import eval_memory
from lvm import evaluate
from lvm import sharding as lvm_sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NUM_QUESTIONS = 21  # 3 batches of 8, the last one short


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  """A POPE folder (21 questions, one image corrupt, one missing) and the tokenizer's dir."""
  root = tmp_path_factory.mktemp('eval_sharded')
  data = eval_memory.write_pope(str(root / 'pope'), NUM_QUESTIONS, image_px=12, num_image_files=9)
  (root / 'pope' / 'val2014' / '4.png').write_bytes(b'not a png')  # questions 4 and 13
  with open(root / 'pope' / 'coco_pope_random.json', 'a') as f:
    f.write(json.dumps({'question_id': 99, 'image': 'gone.png', 'text': 'Is there a cat?',
                        'label': 'yes'}) + '\n')
  return root, data


def _answers(out_dir):
  with open(os.path.join(out_dir, 'answers.jsonl')) as f:
    return [json.loads(line) for line in f]


def _run(root, data, mesh, name):
  config, text_gen = eval_memory.tiny_text_generator(str(root / 'tok'), mesh=mesh)
  out = str(root / name)
  result = evaluate.run(text_gen, config, 'pope', data, out, batch_size=8, max_new_tokens=4)
  return result, _answers(out)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_same_answers_on_1_and_8_devices_and_2_processes(bench):
  root, data = bench
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                          lvm_sharding.MESH_AXES)
  result, reference = _run(root, data, one, 'one')
  assert result['num_questions'] == NUM_QUESTIONS + 1
  assert result['skipped'] == {'corrupt_image': 2, 'missing_image': 1}
  assert result['num_scored'] == len(reference) == NUM_QUESTIONS - 2
  assert len({a['answer'] for a in reference}) > 1  # answers depend on the question/image
  result8, answers8 = _run(root, data, None, 'eight')  # data axis over all 8 devices
  assert answers8 == reference
  assert result8['skipped'] == result['skipped']
  assert result8['scores'] == result['scores']

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  out = str(root / 'two')
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'eval_process_worker.py'), f'127.0.0.1:{port}', '2',
       str(i), str(root / 'tok'), data, out], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  reports = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, stderr[-3000:]
    reports.append(json.loads(stdout.strip().splitlines()[-1]))
  for pid, r in enumerate(reports):
    assert (r['devices'], r['processes'], r['mesh']['data']) == (8, 2, 8)
    # Each process decodes the images of its half of every batch only.
    assert r['local_rows'] == [4 * pid, 4 * pid + 4]
    # Bad images found by either process are counted once, on every process.
    assert r['skipped'] == result['skipped'] and r['num_scored'] == result['num_scored']
  assert _answers(out) == reference  # written once, by process 0, in the original order
