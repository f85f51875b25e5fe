"""lvm.flops against a count by hand on the tiny config."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
import lvm.flops
import lvm.synthetic
from lvm import hooks
from lvm import metrics

# configs/tiny.py: decoder D=64 F=128 heads 4 kv 2 head_dim 16 V=512, 2 layers;
# CLIP 32px / 8px patches (16 patches + class token), width 32, mlp 64, 2 layers,
# feature layer -2; projector mlp2x_gelu 32 -> 64 -> 64.
D, F, H, K, DH, V, LAYERS = 64, 128, 4, 2, 16, 512, 2
DEC_LAYER = D * H * DH + 2 * D * K * DH + H * DH * D + 3 * D * F + 2 * D
N_DEC = LAYERS * DEC_LAYER + D + D * V  # blocks, final norm, LM head (no input embedding)
W, MLP, T = 32, 64, 17
VIS_LAYER = 4 * (W * W + W) + 2 * (W * MLP) + MLP + W + 4 * W
# Hidden state -2 needs 1 of the 2 layers; plus the patch conv and pre-LN.
N_VIS_1 = 1 * VIS_LAYER + 8 * 8 * 3 * W + 2 * W
N_PROJ = W * D + D + D * D + D


def test_param_counts():
  counts = lvm.flops.param_counts(tiny.get_config())
  assert counts['decoder'] == N_DEC + V * D
  assert counts['projector'] == N_PROJ
  assert counts['vision'] == 2 * VIS_LAYER + 8 * 8 * 3 * W + W + T * W + 4 * W
  assert counts['total'] == counts['vision'] + counts['projector'] + counts['decoder']


@pytest.mark.parametrize('trainable,mult', [(lvm.flops.FINETUNE, 6), (lvm.flops.PRETRAIN, 4)])
def test_per_token(trainable, mult):
  out = lvm.flops.per_token(tiny.get_config(), 64, trainable)
  assert out['n_decoder'] == N_DEC
  assert out['total'] == mult * N_DEC + 6 * LAYERS * H * DH * 64
  assert f'{mult} x N_dec' in out['formula']


def test_per_image_and_step():
  config = tiny.get_config()
  out = lvm.flops.per_image(config, lvm.flops.FINETUNE)
  assert out['tokens'] == T and out['visual_tokens'] == 16
  assert out['vision'] == T * (2 * N_VIS_1 + 4 * 1 * W * T)  # frozen tower: forward only
  assert out['projector'] == 16 * 4 * N_PROJ  # trainable, tower below frozen: 2 + 2
  step = lvm.flops.per_step(config, 8, 64, 1)
  assert step == 8 * 64 * lvm.flops.per_token(config, 64)['total'] + 8 * out['total']
  # Training the tower too: 3x its forward.
  full = lvm.flops.per_image(config, r'.*')
  assert full['vision'] == 3 * out['vision'] and full['projector'] == 16 * 6 * N_PROJ


def test_mfu():
  assert lvm.flops.mfu(989e12, 1.0, 2, 989.0) == pytest.approx(0.5)


@pytest.mark.parametrize('trainable,mult', [(lvm.flops.FINETUNE, 6), (lvm.flops.PRETRAIN, 4)])
def test_scored_tokens_drop_the_lm_head_at_unscored_positions(trainable, mult):
  config = tiny.get_config()
  head = lvm.flops.lm_head_per_position(config, trainable)
  assert head == {'total': mult * V * D, 'mult': mult, 'n_head': V * D}
  every = lvm.flops.per_step(config, 8, 64, 1, trainable)
  assert lvm.flops.per_step(config, 8, 64, 1, trainable, scored_tokens=64) == every
  assert lvm.flops.per_step(config, 8, 64, 1, trainable, scored_tokens=20) == (
      every - 8 * (64 - 20) * mult * V * D)


def test_anyres_counts_the_tiles_the_tower_runs_on():
  """An anyres image costs its tiles x one fixed-size pass; model_flops counts given tiles."""
  fixed = tiny.get_config()
  config = tiny.get_config()
  config.model.anyres.pinpoints = [[32, 64], [64, 32], [64, 64]]  # T = 1 + 4
  one = lvm.flops.per_image(fixed, lvm.flops.FINETUNE)
  assert lvm.flops.per_image(config, lvm.flops.FINETUNE, tiles=3)['total'] == 3 * one['total']
  assert lvm.flops.per_image(config, lvm.flops.FINETUNE)['total'] == 5 * one['total']
  every = lvm.flops.model_flops(config, 4, 64, 'prefill')  # 4 rows x 1 image x 5 slots
  real = lvm.flops.model_flops(config, 4, 64, 'prefill', tiles=7)
  tower = lvm.flops.per_image(fixed, r'$^')
  assert every['parts']['vision'] == 20 * tower['vision']
  assert real['parts']['vision'] == 7 * tower['vision']
  assert real['parts']['projector'] == 7 * tower['projector'] and 'tiles=7' in real['formula']
  assert real['parts']['decoder'] == every['parts']['decoder']


def test_packed_rows_count_real_tokens_attending_within_their_sample():
  config = tiny.get_config()
  b, l = 2, 64
  full = lvm.flops.model_flops(config, b, l)
  token = lvm.flops.per_token(config, l)
  # One sample filling each row is the unpacked count.
  assert lvm.flops.model_flops(config, b, l, samples=[[l]] * b)['total'] == full['total']
  # Row 0: two samples of 32; row 1: one of 40 and 24 padding positions. Matmuls per real
  # token; attention per token linear in its own sample's length; 3 of 4 image slots used.
  packed = lvm.flops.model_flops(config, b, l, samples=[[32, 32], [40]], images=3)
  per_key = 3 * 2 * LAYERS * H * DH  # training: forward + 2 backward, causal halved
  assert packed['parts']['decoder'] == (104 * token['matmul']
                                        + (32 * 32 * 2 + 40 * 40) * per_key)
  assert packed['tokens'] == 104 and '104 real tokens' in packed['formula']
  image = lvm.flops.per_image(config)
  assert packed['parts']['vision'] == 3 * image['vision']
  assert lvm.flops.segment_lengths(np.array([[1, 1, 2, 2, 2, 0], [3, 3, 0, 0, 0, 0]])) == [
      [2, 3], [2]]


@pytest.mark.parametrize('scored', [0, 24])
def test_real_counts_of_a_batch_give_the_count_from_its_sample_lengths(scored):
  """What the train step counts on the device (`real_counts`) and the trainer turns into
  FLOPs (`real_step_flops`) is `model_flops` at the batch's own sample lengths."""
  config = tiny.get_config()
  b, l = 4, 1024
  with config.unlocked():
    config.train.batch_size, config.data.seq_len = b, l
    config.train.max_scored_tokens = scored
  count = jax.jit(functools.partial(lvm.flops.real_counts, scored_tokens=scored))
  packed = lvm.synthetic.packed_rows(config, b, l, seed=1)
  samples = lvm.flops.segment_lengths(packed['segment_ids'])
  assert max(map(len, samples)) >= 2  # rows holding several samples
  counts = count(packed)
  assert int(counts['real_tokens']) == sum(map(sum, samples)) < b * l
  # The image slots the packer filled (text-only samples and the row's spare slots stay 0).
  images = int(np.sum(np.any(packed['images'] != 0, axis=(2, 3, 4))))
  assert 0 < int(counts['real_images']) == images < packed['images'].shape[0] * \
      packed['images'].shape[1]
  expected = lvm.flops.model_flops(config, b, l, samples=samples, images=images)['total']
  assert lvm.flops.real_step_flops(config, **counts) == pytest.approx(expected, rel=1e-6)
  # Right-padded rows (unpacked): each row is one sample, an empty row none; no images.
  lengths = np.array([l, 100, 3, 0])
  counts = count({'attention_mask': np.arange(l)[None] < lengths[:, None]})
  expected = lvm.flops.model_flops(config, b, l, samples=[[l], [100], [3], []],
                                   images=0)['total']
  assert lvm.flops.real_step_flops(config, **counts) == pytest.approx(expected, rel=1e-6)
  # Every position and image slot real: the full count.
  full = lvm.flops.model_flops(config, b, l)['total']
  counts = count({'attention_mask': np.ones((b, l), bool),
                  'images': np.ones((b, config.data.max_images, 32, 32, 3), np.float32)})
  assert lvm.flops.real_step_flops(config, **counts) == pytest.approx(full, rel=1e-6)
  # Cached tower features [B, N, P, Dv] count their slots the same way.
  features = np.zeros((b, config.data.max_images, 4, 8), np.float32)
  features[:3, 0] = 1.0
  assert int(count({'attention_mask': np.ones((b, l), bool),
                    'image_features': features})['real_images']) == 3


def test_real_counts_of_an_anyres_batch_count_its_images_own_tiles():
  """An anyres batch: the tower counted on the tiles that hold an image's base or grid tile,
  as `lvm.bench` counts it (`model_flops(..., tiles=)`), not on every tile slot."""
  config = tiny.get_config()
  b, l = 8, 256
  with config.unlocked():
    config.train.batch_size, config.data.seq_len = b, l
    config.model.anyres.pinpoints = [[32, 64], [64, 32], [32, 32]]  # T = 1 + 2 slots
  batch = lvm.synthetic.anyres_rows(config, b, l, seed=2)
  tiles = int(np.sum(np.any(batch['images'] != 0, axis=(3, 4, 5))))
  assert tiles < batch['images'][..., 0, 0, 0].size  # square images leave a slot empty
  counts = jax.jit(lvm.flops.real_counts)(batch)
  assert int(counts['real_images']) == tiles
  expected = lvm.flops.model_flops(config, b, l, tiles=tiles)['total']
  assert lvm.flops.real_step_flops(config, **counts) == pytest.approx(expected, rel=1e-6)
  every = lvm.flops.model_flops(config, b, l)['total']
  assert lvm.flops.real_step_flops(config, **counts) < every


def test_logged_real_token_mfu_averages_every_step_of_the_window(tmp_path, monkeypatch):
  """ReportProgress as lvm.train drives it: each step's counts read once the step has run,
  averaged over the steps between two logged ones; the real-token MFU is the full MFU scaled
  by real / full FLOPs (same step time)."""
  config = tiny.get_config()
  with config.unlocked():
    config.train.log_every = 3
  b, l = config.train.batch_size, config.data.seq_len
  monkeypatch.setattr(lvm.flops, 'peak_tflops', lambda device: 1.0)
  writer = metrics.MetricWriter(str(tmp_path))
  progress = hooks.ReportProgress(writer, config, steps=6, first_step=0,
                                  lr_schedule=lambda step: 1e-3)
  real = {s: l * (b - 1) - 5 * s for s in range(1, 7)}  # a different count every step
  previous = None
  for step in range(1, 7):
    m = {'loss': jnp.float32(1.0), 'grad_norm': jnp.float32(1.0),
         'real_tokens': jnp.float32(real[step]), 'attended_pairs': jnp.float32(real[step] * l),
         'unscored_real': jnp.float32(0.0), 'real_images': jnp.float32(step % 3)}
    progress.dispatched(step, m, previous)
    previous = m
    if progress.due(step):
      progress(step, None, {k: float(v) for k, v in m.items()})
  writer.close()
  record = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')][-1]
  assert record['step'] == 6 and not {'attended_pairs', 'real_images'} & set(record)
  mean = {k: np.mean([real[s] * f for s in (4, 5, 6)])
          for k, f in (('real_tokens', 1), ('attended_pairs', l))}
  mean['real_images'] = np.mean([s % 3 for s in (4, 5, 6)])
  assert record['real_tokens_per_sec'] / record['tokens_per_sec'] == pytest.approx(
      mean['real_tokens'] / (b * l))
  assert record['mfu_real_tokens'] / record['mfu'] == pytest.approx(
      lvm.flops.real_step_flops(config, **mean) / lvm.flops.train_step_flops(config))
