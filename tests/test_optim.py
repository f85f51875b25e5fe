"""Schedules, trainable masks, weight-decay masks and per-module learning rates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lvm import config as lvm_config
from lvm import optim


def _opt(**overrides):
  c = lvm_config.get_config().optimizer
  c.update(overrides)
  return c


def test_cosine_with_warmup_steps():
  s = optim.schedule(_opt(lr=1.0, warmup_steps=10, schedule='cosine', end_lr_ratio=0.1), 110)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)


def test_linear_and_constant_and_warmup_ratio():
  lin = optim.schedule(_opt(lr=2.0, warmup_steps=0, warmup_ratio=0.1, schedule='linear',
                            end_lr_ratio=0.0), 100)
  np.testing.assert_allclose([lin(0), lin(10), lin(55), lin(100)], [0.0, 2.0, 1.0, 0.0],
                             atol=1e-6)
  const = optim.schedule(_opt(lr=3.0, warmup_steps=4, schedule='constant'), 100)
  np.testing.assert_allclose([const(2), const(4), const(99)], [1.5, 3.0, 3.0], atol=1e-6)
  with pytest.raises(ValueError, match='schedule'):
    optim.schedule(_opt(schedule='step'), 10)


def test_stage_regexes_and_split():
  params = {'vision': {'a': 1}, 'projector': {'linear_1': {'kernel': 2}},
            'decoder': {'norm': {'scale': 3}}}
  train_c = ml_collections.ConfigDict({'stage': 'pretrain', 'trainable': ''})
  trainable, frozen = optim.split(params, optim.trainable_regex(train_c))
  assert trainable == {'projector': {'linear_1': {'kernel': 2}}}
  assert optim.merge(trainable, frozen) == params
  train_c.stage = 'finetune'
  assert set(optim.split(params, optim.trainable_regex(train_c))[0]) == {'projector', 'decoder'}
  train_c.stage, train_c.trainable = 'custom', '^vision/'
  assert optim.split(params, optim.trainable_regex(train_c))[0] == {'vision': {'a': 1}}
  train_c.trainable = ''
  with pytest.raises(ValueError, match='config.train.trainable'):
    optim.trainable_regex(train_c)
  train_c.stage = 'stage1'
  with pytest.raises(ValueError, match='config.train.stage'):
    optim.trainable_regex(train_c)


def test_weight_decay_skips_norms_and_biases_and_module_lr_scales_updates():
  params = {'projector': {'linear_1': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}},
            'decoder': {'norm': {'scale': jnp.ones((2,))}, 'lm_head': {'kernel': jnp.ones((2, 2))}}}
  mask = optim.flatten(optim.decay_mask(params))
  assert mask == {'projector/linear_1/kernel': True, 'projector/linear_1/bias': False,
                  'decoder/norm/scale': False, 'decoder/lm_head/kernel': True}
  c = _opt(lr=0.1, warmup_steps=0, warmup_ratio=0.0, schedule='constant', weight_decay=0.0,
           clip_norm=0.0)
  c.module_lr = {'^projector/': 1.0}
  tx, _ = optim.make(c, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = optim.flatten(updates)
  # Adam's first step moves every coordinate by -lr.
  np.testing.assert_allclose(flat['projector/linear_1/kernel'], -1.0, rtol=1e-4)
  np.testing.assert_allclose(flat['decoder/lm_head/kernel'], -0.1, rtol=1e-4)


def test_decoupled_weight_decay_skips_biases():
  params = {'w': {'kernel': jnp.full((2,), 2.0), 'bias': jnp.full((2,), 2.0)}}
  c = _opt(lr=0.1, warmup_steps=0, warmup_ratio=0.0, schedule='constant', weight_decay=0.5,
           clip_norm=1e-3)
  tx, _ = optim.make(c, 10)
  grads = jax.tree.map(lambda x: x * 100.0, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's normalized step (-lr) plus decoupled decay (-lr * wd * param) on the kernel only.
  np.testing.assert_allclose(updates['w']['kernel'], -0.1 - 0.1 * 0.5 * 2.0, rtol=1e-3)
  np.testing.assert_allclose(updates['w']['bias'], -0.1, rtol=1e-3)
