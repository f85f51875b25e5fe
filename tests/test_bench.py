"""Tests of lvm/bench.py (and the FLOPs it reports), and benchmarks/scaling_checks.py.

Every test process sees 8 emulated CPU devices (tests/conftest.py).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import scaling_checks
from configs import tiny
from lvm import bench
from lvm import flops
from lvm import losses
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm import synthetic


def test_scan_compile_time_does_not_grow_with_depth():
  r = scaling_checks.check_compile(depth_small=2, depth_large=32, repeats=1)
  assert r['ok'], scaling_checks.format_result(r)


def test_fsdp_shards_params_and_optimizer_state():
  r = scaling_checks.check_fsdp(num_devices=8)
  assert len(r['per_device_bytes']) == 8
  assert r['ok'], scaling_checks.format_result(r)


def test_model_flops_train_is_lvm_flops_and_prefill_is_forward():
  config = tiny.get_config()
  b, l = 2, 64
  train = flops.model_flops(config, b, l, 'train')
  assert train['total'] == flops.per_step(config, b, l, 1, optim.trainable_regex(config.train))
  # The trainer's MFU counts the same (its config's batch and length), never None silently.
  assert flops.train_step_flops(config) == flops.model_flops(
      config, config.train.batch_size, config.data.seq_len)['total'] > 0
  # Forward only, counted by hand from the tiny shapes: per layer q,o 64x64, k,v 64x32
  # (2 kv heads of 16), mlp 3 x 64x128, 2 norm scales; plus the final norm and the LM head
  # 64x512 (lvm.flops counts every decoder parameter but the input embedding).
  n_dec = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64 + 64 * 512
  prefill = flops.model_flops(config, b, l, 'prefill')
  assert prefill['parts']['decoder'] == b * l * (2 * n_dec + 2 * 2 * 4 * 16 * l)
  # finetune trains the decoder: 3x its forward count.
  assert train['parts']['decoder'] == 3 * prefill['parts']['decoder']
  assert train['parts']['vision'] == prefill['parts']['vision']  # frozen, no gradient
  decode = flops.model_flops(config, b, l, 'decode', cache_len=70)
  assert decode['total'] == b * (2 * n_dec + 4 * 2 * 4 * 16 * 70)


def test_peak_table():
  class Dev:
    def __init__(self, platform, kind):
      self.platform, self.device_kind = platform, kind
  assert flops.peak_tflops(Dev('gpu', 'NVIDIA H100 80GB HBM3')) == 989.0
  assert flops.peak_tflops(Dev('gpu', 'NVIDIA H200')) == 989.0
  assert flops.peak_tflops(Dev('tpu', 'TPU v5 lite')) == 197.0
  assert flops.peak_tflops(Dev('tpu', 'TPU v5p')) == 459.0
  assert flops.peak_tflops(Dev('tpu', 'TPU v4')) == 275.0
  assert flops.peak_tflops(Dev('tpu', 'TPU v6 lite')) == 918.0
  assert flops.peak_tflops(Dev('cpu', 'cpu')) is None


def test_trainer_loss_is_the_mean_cross_entropy_with_its_numpy_gradient():
  # The loss every benchmark times is the trainer's (lvm.losses.loss_fn); check it and its
  # gradient against numpy, with a stand-in model that returns the logits it is given.
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, (2, 5)).astype(np.int32)
  mask = np.array([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], bool)

  class Logits:
    def apply(self, variables, images, input_ids, logit_positions=None):
      del images, input_ids, logit_positions
      return variables['params']

  batch = {'input_ids': jnp.asarray(ids), 'loss_mask': jnp.asarray(mask)}
  num = float(mask[:, 1:].sum())
  loss = lambda x: losses.loss_fn(x, batch, model=Logits(), num_tokens=num)[0]
  got = float(loss(jnp.asarray(logits)))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t]]
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  grad = jax.grad(loss)(jnp.asarray(logits))
  num = np.zeros_like(logits)
  for b in range(2):
    for t in range(1, 5):
      if mask[b, t]:
        p = np.exp(logp[b, t - 1])
        p[ids[b, t]] -= 1
        num[b, t - 1] = p / len(terms)
  np.testing.assert_allclose(np.asarray(grad), num, atol=1e-6)


def test_bench_times_the_trainers_jitted_step():
  config = tiny.get_config('scan=0')
  with config.unlocked():
    config.mesh.data = -1
    config.train.max_scored_tokens = 48
  b = bench.Bench(config)
  batch = b.shard_batch(synthetic.batch(config, 8, config.data.seq_len))
  state, step = b.train_step(b.init_params(), batch)
  # The very function the trainer jits (lvm.step.train_step, with the config's options) ...
  assert isinstance(step, step_lib.JittedStep)
  wrapped = step.jitted.__wrapped__
  assert wrapped.func is step_lib.train_step
  assert wrapped.keywords['scored_tokens'] == 48 and wrapped.keywords['tx'] is b.factory.tx
  # ... and the same program as the trainer's own: lvm.train jits its step as below.
  tx, _ = optim.make(config.optimizer, 1000)
  factory = state_lib.StateFactory(config, b.model, tx, b.mesh, sharding.rules(config))
  trainer_step = step_lib.jit_train_step(factory, batch, **step_lib.step_options(config.train))
  want = trainer_step.lower(factory.abstract, batch).as_text()
  assert step.lower(state, batch).as_text() == want


def test_bench_times_the_generators_own_functions():
  config = tiny.get_config('scan=0')
  with config.unlocked():
    config.mesh.data = -1
  b = bench.Bench(config)
  gen = b.generator(b.init_params())
  # Generator.prefill / decode are the halves of the loop Generator.generate runs.
  assert gen.prefill.__wrapped__.__func__ is type(gen)._prefill
  assert gen.decode.__wrapped__.__func__ is type(gen)._decode


@pytest.mark.parametrize('mode', ['train', 'prefill', 'decode'])
def test_run_reports_every_mode(mode):
  config = tiny.get_config('scan=0')
  with config.unlocked():
    config.mesh.data = -1
  r = bench.run(config, mode, steps=2, warmup=1, decode_len=8)
  assert r['num_devices'] == 8
  assert r['step_s']['n'] == 2 and r['step_s']['median'] > 0
  assert r['mfu'] is None  # no peak is claimed on CPU
  assert r['model_flops_per_step'] > 0
  assert r['tokens_per_s'] == pytest.approx(
      (8 if mode == 'decode' else 8 * 64) / r['step_s']['median'])
  if mode == 'train':
    assert np.isfinite(r['loss']) and abs(r['loss'] - np.log(512)) < 1.0
  if mode == 'decode':
    read = r['decode_read_bytes']
    assert r['bandwidth_limit_tokens_per_s_per_row'] == pytest.approx(
        r['copy_bandwidth_GBps'] * 1e9 / (read['weights'] + read['kv_cache']))
    assert r['fraction_of_bandwidth_limit'] == pytest.approx(
        r['decode_tokens_per_s_per_row'] / r['bandwidth_limit_tokens_per_s_per_row'])


def test_decode_reads_the_decoder_and_the_filled_cache_slots():
  config = tiny.get_config()  # decoder width 64 x 2 layers, 4 heads, 2 KV heads of 16, vocab 512
  params = bench.Bench(config).init_params()
  cache = {'k': jnp.zeros((2, 3, 40, 2, 16), jnp.bfloat16),
           'v': jnp.zeros((2, 3, 40, 2, 16), jnp.bfloat16)}
  read = bench.decode_read_bytes(params, cache, batch=3, filled=10)
  # float32 params: per layer 2 norms of 64, q/o 64x64, k/v 64x32, gate/up/down 64x128;
  # final norm 64; LM head 64x512; 3 embedding rows of 64. Not the tower or projector.
  per_layer = 2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
  assert read['weights'] == 4 * (2 * per_layer + 64 + 64 * 512 + 3 * 64)
  # k and v: 2 layers x 3 rows x 10 of 40 slots x 2 heads x 16, 2 bytes each.
  assert read['kv_cache'] == 2 * (2 * 3 * 10 * 2 * 16) * 2
  assert read['kv_cache_allocated'] == 4 * read['kv_cache']



def test_benchmark_path_imports_without_grain_or_tensorflow():
  # The GPU image has jax, flax, optax, orbax, torch and transformers but no grain or
  # tensorflow(-datasets): the benchmark and generation paths must not import them.
  blocker = (
      'import sys, importlib.abc\n'
      'class Block(importlib.abc.MetaPathFinder):\n'
      '  def find_spec(self, name, path, target=None):\n'
      "    if name.split('.')[0] in ('grain', 'tensorflow', 'tensorflow_datasets'):\n"
      "      raise ImportError('not on the GPU image: ' + name)\n"
      'sys.meta_path.insert(0, Block())\n'
      'import lvm.bench, lvm.generate, lvm.hf, lvm.evaluate, lvm.validate\n'
      'from benchmarks import gpu_suite, generate_speed\n')
  p = subprocess.run([sys.executable, '-c', blocker], capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     check=False)
  assert p.returncode == 0, p.stderr[-2000:]


def test_packed_bench_counts_real_tokens_and_images():
  config = tiny.get_config('scan=0')
  with config.unlocked():
    config.mesh.data = -1
    config.data.seq_len = 1024
    config.data.packing = True
  batch = synthetic.packed_rows(config, 8, 1024)
  samples = flops.segment_lengths(batch['segment_ids'])
  assert sum(map(len, samples)) > 8  # LLaVA-665K-like samples: several a 1024-token row
  for r, row in enumerate(samples):
    real = int(batch['attention_mask'][r].sum())
    assert sum(row) == real and not batch['attention_mask'][r, real:].any()  # padding last
    start = 0
    for s, n in enumerate(row, 1):  # each sample: 16 image tokens, text, positions from 0
      seg = slice(start, start + n)
      assert (batch['segment_ids'][r, seg] == s).all()
      assert (batch['positions'][r, seg] == np.arange(n)).all()
      assert (batch['input_ids'][r, start:start + 16] == config.model.image_token_id).all()
      assert not batch['loss_mask'][r, start:start + 17].any() and batch['loss_mask'][r, seg].sum() == n - 17
      start += n
    used = np.any(batch['images'][r] != 0, axis=(1, 2, 3))
    assert used.sum() == len(row) and used[:len(row)].all()  # one image a sample, in order
  r = bench.run(config, 'train', steps=2, warmup=1)
  assert r['packed']['samples'] == sum(map(len, samples))  # the same seeded batch
  assert r['model_flops_per_step'] == flops.model_flops(
      config, 8, 1024, samples=samples, images=r['packed']['images'])['total']
  real = sum(map(sum, samples))
  assert r['packed']['padding'] == pytest.approx(1 - real / (8 * 1024))
  assert r['tokens_per_s'] == pytest.approx(real / r['step_s']['median'])
  assert np.isfinite(r['loss'])


@pytest.mark.parametrize('mode', ['train', 'prefill'])
def test_anyres_bench_counts_the_images_own_tiles(mode):
  from lvm.models import anyres_model  # pylint: disable=import-outside-toplevel
  config = tiny.get_config('scan=0')
  with config.unlocked():
    config.mesh.data = -1
    config.data.seq_len = 256
    config.model.anyres.pinpoints = [[32, 64], [64, 32], [32, 32]]  # T = 1 + 2 slots
  batch = synthetic.anyres_rows(config, 8, 256)
  lay = anyres_model.layout(config.model)
  # The row's image tokens are the model's count for that size, and its tiles fill slots.
  anyres_model.check_image_tokens(batch['input_ids'], batch['image_sizes'],
                                  config.model.image_token_id, lay)
  tiles = np.any(batch['images'] != 0, axis=(3, 4, 5))
  # Photos take a 1 x 2 or 2 x 1 grid (3 tiles), squares a 1 x 1 grid (2 tiles).
  assert tiles.shape == (8, 1, 3) and 16 < tiles.sum() < 24
  r = bench.run(config, mode, steps=2, warmup=1)
  assert r['anyres'] == {'real_tiles': int(tiles.sum()), 'tile_slots': 24}
  assert r['model_flops_per_step'] == flops.model_flops(
      config, 8, 256, mode, tiles=int(tiles.sum()))['total']
  if mode == 'train':
    assert np.isfinite(r['loss'])
