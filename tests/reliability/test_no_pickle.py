"""Checkpoints and weights load without unpickling anything.

Each load runs in a process where unpickling raises (`no_pickle.py`: pickle's loaders
replaced and an audit hook refusing `pickle.find_class`): resuming a run through
`lvm.main` (orbax train state + JSON data state), `lvm.checkpoint.load_params`, and
`lvm.hf.load` of a transformers LLaVA folder written with safetensors. A control case
shows the guard really stops unpickling, so the test can fail.
"""

import os
import shutil
import subprocess
import sys

import pytest

import reliability_helpers as h

GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'no_pickle.py')

pytestmark = pytest.mark.slow


def _guarded(shared, *args, timeout=300):
  return subprocess.run([sys.executable, GUARD, *args], cwd=h.REPO, env=h.env(shared),
                        capture_output=True, text=True, timeout=timeout)


def test_guard_stops_unpickling(shared):
  proc = _guarded(shared, '-c', 'import numpy as np, io\n'
                  'buf = io.BytesIO(); np.save(buf, np.array([{"a": 1}], dtype=object))\n'
                  'buf.seek(0); np.load(buf, allow_pickle=True)')
  assert proc.returncode != 0 and 'UnpicklingForbidden' in proc.stderr, proc.stderr[-2000:]


def test_resume_and_load_params_without_unpickling(shared, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference.workdir, workdir)
  # A finished run: lvm.main restores the newest checkpoint (state + data) and stops.
  proc = _guarded(shared, '-m', 'lvm.main', *h.main_cmd(shared, workdir, *h.SINGLE_MESH)[3:])
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert f'Resumed from {workdir}/checkpoints/{h.NUM_STEPS}' in out
  code = ('from lvm import checkpoint\nimport jax\n'
          f'config, params = checkpoint.load_params({workdir!r})\n'
          'print("leaves", len(jax.tree.leaves(params)), config.model.decoder.width)')
  proc = _guarded(shared, '-c', code)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'leaves' in proc.stdout and proc.stdout.split()[-1] == '64'


def test_hf_safetensors_load_without_unpickling(shared, tmp_path):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)
  text = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=500)
  model = transformers.LlavaForConditionalGeneration(config)
  hf_dir = str(tmp_path / 'hf')
  model.save_pretrained(hf_dir, safe_serialization=True)
  # A pickled copy beside it must not be what is read.
  torch.save(model.state_dict(), os.path.join(hf_dir, 'pytorch_model.bin'))
  proc = _guarded(shared, '-c', 'from lvm import hf\nimport jax\n'
                  f'cfg, params = hf.load({hf_dir!r})\n'
                  'print("leaves", len(jax.tree.leaves(params)))')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert int(proc.stdout.split()[-1]) > 20
