"""benchmarks/generate_speed.py at tiny scale on the CPU: lvm and transformers' `generate`
(dynamic and static caches) produce the same greedy tokens from the same saved weights, every
(batch, new tokens) row is timed on both sides, and lvm pads the prompt to its bucket."""

import json
import os
import subprocess
import sys

import jax

from benchmarks import generate_speed
from lvm import models
from lvm.hf import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_speed_tiny_matches_transformers(tmp_path):
  out = tmp_path / 'r.json'
  p = subprocess.run(
      [sys.executable, 'benchmarks/generate_speed.py', '--batches=1,3', '--new_tokens=5',
       '--prompt_len=40', '--repeats=1', '--hf_cache=dynamic,static', '--torch_threads=1',
       f'--out={out}'], cwd=ROOT, capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['prompt_tokens'] == 1 + 16 + 40 and r['prompt_bucket'] == 64
  assert [(x['batch'], x['new_tokens']) for x in r['rows']] == [(1, 5), (3, 5)]
  for row in r['rows']:
    # float32 on both sides: the same greedy tokens, row by row, with either cache.
    assert row['hf_dynamic_first_difference'] is None
    assert row['hf_static_first_difference'] is None
    assert row['lvm_questions_per_s'] == row['batch'] / row['lvm_s'] > 0
    best = row[f"hf_{row['hf_best_cache']}_s"]
    assert row['speedup'] == best / row['lvm_s']
  assert r['lvm_ttft_ms'] > 0 and set(r['hf_ttft_ms']) == {'dynamic', 'static'}
  assert '| 3 | 5 |' in p.stdout


def test_7b_preset_is_llava15_7b():
  hf = generate_speed.hf_config(generate_speed.SIZES['7b'])
  model = configs.llava_from_hf(hf.to_dict())
  d = model.decoder
  assert (d.width, d.depth, d.heads, d.kv_heads, d.mlp_dim, d.vocab_size) == (
      4096, 32, 32, 32, 11008, 32064)
  assert model.image_token_id == 32000 and model.vision.image_size == 336
  assert (model.vision.width, model.vision.depth) == (1024, 24)
  params = sum(int(x.size) for x in jax.tree.leaves(models.abstract_params(model)))
  assert abs(params - 7.06e9) < 0.01e9  # llava-1.5-7b-hf: 7.06 B parameters
