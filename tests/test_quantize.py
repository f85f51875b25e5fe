"""Frozen weights stored quantized (lvm/quantize.py): accuracy, training, sharding, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import checkpoint as ckpt_lib
from lvm import inference
from lvm import models
from lvm import optim
from lvm import quantize
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm import validate

import synthetic_data  # pylint: disable=import-error
import train_utils  # pylint: disable=import-error


def _factory(mode, stage, shape=(1, 1, 1), **overrides):
  config = train_utils.tiny_config(**{'train.stage': stage, 'train.frozen_quantization': mode,
                                      **overrides})
  mesh = train_utils.mesh_for(config, shape)
  tx, _ = optim.make(config.optimizer, 10)
  return config, state_lib.StateFactory(config, models.build(config), tx, mesh,
                                        sharding.rules(config))


def _state(factory, host_params):
  """The train state of `factory` around float host params."""
  shardings = jax.tree.map(lambda a: a.sharding, factory.abstract_params)
  return factory.from_params(jax.device_put(host_params, shardings))


@pytest.mark.parametrize('mode, bound', [('int8', 127), ('int4', 7)])
def test_absmax_quantization_is_within_half_a_step_per_channel(mode, bound):
  w = jax.random.normal(jax.random.key(0), (3, 16, 4, 8)).at[1, :, 2, 5].set(0.0)
  q = quantize.quantize(w, mode, (1,))
  assert q.values.dtype == jnp.dtype(mode) and q.scale.shape == (3, 1, 4, 8)
  values = np.asarray(q.values.astype(jnp.int32))
  assert values.min() >= -bound and values.max() <= bound
  # Each channel's largest weight maps to +-bound; every weight is within half a step.
  np.testing.assert_array_equal(np.abs(values).max(1)[np.asarray(q.scale[:, 0]) != 1], bound)
  err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
  assert np.all(err <= np.asarray(q.scale) / 2 + 1e-7)
  assert np.all(np.asarray(q.dequantize())[1, :, 2, 5] == 0)  # an all-zero channel stays 0


def test_contraction_axes_follow_the_logical_names():
  assert quantize.contraction_axes(('layers', 'embed', 'heads', 'head_dim')) == (1,)
  assert quantize.contraction_axes(('layers', 'heads', 'head_dim', 'embed')) == (1, 2)
  assert quantize.contraction_axes(('embed', 'vocab')) == (0,)


def test_bad_frozen_quantization_is_an_error_naming_the_key():
  config = train_utils.tiny_config(**{'train.frozen_quantization': 'int3'})
  with pytest.raises(ValueError, match=r"train\.frozen_quantization.*'int3'"):
    validate.validate_config(config, 1)
  config = train_utils.tiny_config(**{'train.frozen_quantization': 'int8', 'train.stage': 'full'})
  with pytest.raises(ValueError, match=r"train\.frozen_quantization.*freezes none"):
    validate.validate_config(config, 1)
  with pytest.raises(ValueError, match=r"frozen_quantization='int4'.*freezes no Dense kernel"):
    quantize.axes_tree({'projector': {}}, '.*', 'int4')


def test_quantized_frozen_tower_gives_the_float_models_outputs():
  """Stage 2 freezes the vision tower. Measured here: int8 kernels change the projected
  image tokens by 0.78% (relative L2) and the logits by 0.92% of their largest magnitude;
  int4 (per-channel, no groups) by 15% and 17%. Tolerances are about 2x those."""
  config, factory = _factory('int8', 'finetune')
  assert factory.quantized_axes and all(k.startswith('vision/') for k in factory.quantized_axes)
  host = optim.flatten(jax.device_get(factory.random_params(jax.random.key(0))))
  # Kernels 10x the init scale (std 0.2), so the tower's blocks, not its residual stream,
  # make its output and the quantization error shows in it.
  host = optim.unflatten({k: v * 10 if k.startswith('vision/') and k.endswith('/kernel') else v
                          for k, v in host.items()})
  batch = synthetic_data.global_batch(config, 'train', 0)
  model = factory.model

  @jax.jit
  def outputs(params):
    tokens = model.apply({'params': params}, batch['images'], method=model.embed_image)
    return tokens, model.apply({'params': params}, batch['images'], batch['input_ids'])

  ref_tokens, ref_logits = map(np.asarray, outputs(host))
  for mode, token_tol, logit_tol in (('int8', 2e-2, 2e-2), ('int4', 0.3, 0.35)):
    params = factory.quantize(host) if mode == 'int8' else quantize.quantize_params(
        host, factory.quantized_axes, mode)
    tokens, logits = map(np.asarray, outputs(params))
    rel = np.linalg.norm(tokens - ref_tokens) / np.linalg.norm(ref_tokens)
    assert rel < token_tol, (mode, rel)
    assert np.abs(logits - ref_logits).max() < logit_tol * np.abs(ref_logits).max(), mode


def _train(factory, config, host_params, steps):
  state = _state(factory, host_params)
  initial = jax.device_get(state['params'])  # before the step donates it
  batch = next(synthetic_data.SyntheticIterator(config, 'train', factory.mesh))
  step = step_lib.jit_train_step(factory, batch)
  losses = []
  for _ in range(steps):  # one batch, again and again: the projector must fit it
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, initial, state


def test_training_with_an_int8_frozen_decoder_on_1_and_8_devices_and_checkpoints(tmp_path):
  """Stage 1 (projector trains, vision and decoder frozen in int8): the loss falls, the
  quantized weights stay bit-identical with no optimizer state, 8 devices give the 1-device
  numbers, and a checkpoint of the quantized state restores exactly onto the other mesh."""
  overrides = {'optimizer.lr': 3e-2, 'optimizer.schedule': 'constant'}
  config, one = _factory('int8', 'pretrain', **overrides)
  host = jax.device_get(one.random_params(jax.random.key(0)))
  losses, before, state = _train(one, config, host, steps=4)
  assert losses[-1] < losses[0] - 0.05, losses
  before = optim.flatten(before)
  after = optim.flatten(jax.device_get(state['params']))
  quantized = [k for k, v in after.items() if isinstance(v, quantize.QArray)]
  assert {k.split('/')[0] for k in quantized} == {'vision', 'decoder'}
  for k in quantized:
    assert after[k].values.dtype == jnp.int8
    assert after[k].values.tobytes() == before[k].values.tobytes(), k
  n_projector = sum(v.size for k, v in after.items() if k.startswith('projector/'))
  assert sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim) == 2 * n_projector

  _, eight = _factory('int8', 'pretrain', (2, 2, 2), **overrides)
  losses8, _, state8 = _train(eight, config, host, steps=4)
  np.testing.assert_allclose(losses8, losses, rtol=1e-5)
  spec = state8['params']['decoder']['layers']['mlp']['up_proj']['kernel'].values.sharding.spec
  assert 'fsdp' in spec and 'tensor' in spec, spec  # the int8 values are sharded

  checkpointer = ckpt_lib.Checkpointer(tmp_path, config.checkpoint)
  checkpointer.save(4, state8, {}, config)
  checkpointer.manager.wait_until_finished()
  restored = checkpointer.restore_latest(one.abstract)[1]
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(state8))):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  # Generation and evaluation (lvm.inference) read that checkpoint, dequantized.
  _, loaded = ckpt_lib.load_params(tmp_path, lambda c: inference.abstract_params(c, one.mesh))
  loaded = quantize.dequantize_params(loaded, jnp.float32)
  up = state8['params']['decoder']['layers']['mlp']['up_proj']['kernel']
  np.testing.assert_array_equal(jax.device_get(loaded['decoder']['layers']['mlp']['up_proj'][
      'kernel']), jax.device_get(up.dequantize()))
