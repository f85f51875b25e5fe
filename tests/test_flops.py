"""lvm.flops against a count by hand on the tiny config."""

import numpy as np
import pytest

from configs import tiny
import lvm.flops

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
