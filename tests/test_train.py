"""Loss, evaluation sums, gradient accumulation, frozen stages, NaN stop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm import checkpoint
from lvm import hooks
from lvm import losses
from lvm import models as lvm_models
from lvm import metrics
from lvm import optim
from lvm import state as state_lib
from lvm import train

import synthetic_data  # pylint: disable=import-error
import train_utils  # pylint: disable=import-error


def _batch(ids, mask):
  return {'input_ids': jnp.asarray(ids, jnp.int32), 'loss_mask': jnp.asarray(mask, bool)}


def test_token_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], bool)
  nll, log_z, _, m = losses.token_losses(jnp.asarray(logits), _batch(ids, mask))
  lz = np.log(np.exp(logits[:, :-1]).sum(-1))
  want = lz - np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(nll, want, rtol=1e-5)
  np.testing.assert_allclose(log_z, lz, rtol=1e-5)
  np.testing.assert_array_equal(m, mask[:, 1:])


def test_scored_positions_are_each_rows_supervised_targets_in_order():
  mask = np.array([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1], [0] * 6], bool)
  positions, valid, unscored = losses.scored_positions(jnp.asarray(mask), 3)
  # Position t scores the token at t + 1.
  np.testing.assert_array_equal(positions[:2], [[1, 2, 4], [0, 1, 2]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
  assert int(unscored) == 2  # row 1 has 5 targets


@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'unrolled'])
def test_scoring_only_supervised_positions_keeps_the_loss_and_gradients(scan):
  config = train_utils.tiny_config(**{'model.scan_layers': scan})
  model = lvm_models.build(config)
  batch = jax.tree.map(jnp.asarray, synthetic_data.global_batch(config, 'train', 0))
  params = model.init(jax.random.key(0), *state_lib.dummy_inputs(config, 2))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  most = int(np.max(np.sum(np.asarray(batch['loss_mask'])[:, 1:], axis=1)))
  assert 0 < most < config.data.seq_len - 1  # a real saving
  num = jnp.sum(batch['loss_mask'][:, 1:])

  def grads(scored):
    fn = lambda p: losses.loss_fn(p, batch, model=model, num_tokens=num, z_loss=1e-3,
                                  scored_tokens=scored)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (want, want_aux), want_g = grads(0)
  (got, got_aux), got_g = grads(most)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(got_aux['correct']) == float(want_aux['correct'])
  assert float(got_aux['unscored']) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), want_g,
               got_g)
  (_, short_aux), _ = grads(most - 1)
  assert float(short_aux['unscored']) >= 1  # what stops the training loop


def test_eval_sums_count_answers():
  # Row 0: two answers (targets at 2-3 and 5); row 1: one answer; row 2: padding.
  ids = np.array([[0, 1, 2, 3, 0, 4], [0, 0, 1, 1, 2, 0], [0] * 6])
  mask = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 0], [0] * 6], bool)
  pred = ids[:, 1:].copy()  # Predict each target...
  pred[0, 4] = 9  # ...but get row 0's second answer (target at t=5) wrong,
  pred[1, 0] = 9  # and an unsupervised position of row 1 wrong (must not matter).
  logits = np.full((3, 6, 10), -5.0, np.float32)
  for b in range(3):
    for t in range(5):
      logits[b, t, pred[b, t]] = 5.0
  sums = jax.device_get(losses.eval_sums(jnp.asarray(logits), _batch(ids, mask)))
  assert sums['answers'] == 3 and sums['exact_answers'] == 2
  assert sums['examples'] == 2 and sums['exact_examples'] == 1
  assert sums['tokens'] == 5 and sums['correct_tokens'] == 4


def test_grad_accumulation_matches_full_batch():
  config = train_utils.tiny_config()
  mesh = train_utils.mesh_for(config, (2, 1, 1))
  full, _, factory = train_utils.run_steps(config, mesh, num_steps=3)
  accum, _, _ = train_utils.run_steps(config, mesh, num_steps=3, accum_steps=2,
                                      params=factory.initial_params)
  np.testing.assert_allclose(accum, full, rtol=1e-5)


def test_pretrain_stage_trains_only_the_projector():
  config = train_utils.tiny_config(**{'train.stage': 'pretrain'})
  mesh = train_utils.mesh_for(config, (2, 1, 2))
  losses, state, factory = train_utils.run_steps(config, mesh, num_steps=3)
  assert np.all(np.isfinite(losses))
  before = optim.flatten(factory.initial_params)
  after = optim.flatten(jax.device_get(state['params']))
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  assert changed and all(k.startswith('projector/') for k in changed), changed
  for k in before:
    if not k.startswith('projector/'):
      assert before[k].tobytes() == after[k].tobytes(), k
  # Optimizer state: every param-shaped leaf belongs to the projector.
  projector_shapes = {v.shape for k, v in before.items() if k.startswith('projector/')}
  opt_leaves = [x for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert opt_leaves and all(x.shape in projector_shapes for x in opt_leaves)
  n_projector = sum(v.size for k, v in before.items() if k.startswith('projector/'))
  assert sum(x.size for x in opt_leaves) == 2 * n_projector  # Adam mu and nu only.


class _NanAfter(synthetic_data.SyntheticIterator):
  """Synthetic batches whose images turn NaN from batch `bad` on."""
  bad = 3

  def __next__(self):
    index = self.index
    batch = super().__next__()
    if index >= self.bad and self.split == 'train':
      batch['images'] = batch['images'] * jnp.nan
    return batch


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = train_utils.tiny_config(**{'train.num_steps': 6, 'data.eval_split': '',
                                      'data.test_split': ''})
  make = lambda c, split, mesh, **kw: _NanAfter(c, split, mesh)
  with pytest.raises(hooks.NonFiniteLossError, match='at step 4'):
    train.train_and_evaluate(config, str(tmp_path), make_iterator=make,
                             num_examples=synthetic_data.num_examples)
  steps = [r['step'] for r in metrics.read_jsonl(str(tmp_path))]
  assert steps == [1, 2, 3]
  _, params = checkpoint.load_params(str(tmp_path))
  assert os.path.isdir(tmp_path / 'checkpoints' / '2')
  assert not os.path.exists(tmp_path / 'checkpoints' / '4')
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_too_few_scored_tokens_stop_the_run_with_a_clear_error(tmp_path):
  config = train_utils.tiny_config(**{'train.num_steps': 3, 'train.max_scored_tokens': 2,
                                      'data.eval_split': '', 'data.test_split': ''})
  make = lambda c, split, mesh, **kw: synthetic_data.SyntheticIterator(c, split, mesh)
  with pytest.raises(ValueError, match=r'train.max_scored_tokens=2 is below'):
    train.train_and_evaluate(config, str(tmp_path), make_iterator=make,
                             num_examples=synthetic_data.num_examples)
