"""Packing changes nothing per sample: a packed batch gives each sample the logits, loss and
(summed) gradients it has unpacked, with every attention kernel that runs on a CPU."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvm.models
from lvm import losses
from lvm import sharding
from lvm.data import packing
from lvm.data import pipeline
from tests.data.conftest import tiny_shapes_config

SEQ_LEN = 176  # a shapes sample is ~84 tokens: 2 per packed row


ROWS = 2  # packed rows compared (4 samples unpacked): compiles stay small


@functools.lru_cache(maxsize=1)
def _batches(shapes_dir):
  """(config, packed rows, the same samples unpacked one per row), numpy, from the pipeline."""
  config = tiny_shapes_config(shapes_dir, seq_len=SEQ_LEN, packing=True, pack_max_images=4)
  it = pipeline.make_iterator(config, 'train', sharding.make_mesh(config.mesh))
  packed = {k: v[:ROWS] for k, v in it.next_local().items()}
  unpacked = {k: [] for k in packing.BATCH_KEYS[:4]}
  per_image = 16
  for r in range(ROWS):
    slot = 0
    row = {k: v[r] for k, v in packed.items()}
    for sl in packing.segments_of(row):
      ids = row['input_ids'][sl]
      n = int((ids == config.model.image_token_id).sum()) // per_image
      images = np.zeros((1, *row['images'].shape[1:]), np.float32)
      images[:n] = row['images'][slot:slot + n]
      slot += n
      one = it.processor.pad(ids, row['loss_mask'][sl], images)
      for k in unpacked:
        unpacked[k].append(one[k])
  return config, packed, {k: np.stack(v) for k, v in unpacked.items()}


@functools.lru_cache(maxsize=None)
def _params(shapes_dir):
  model = lvm.models.build(_batches(shapes_dir)[0].model)
  images = jnp.zeros((1, 1, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, jnp.zeros((1, 8), jnp.int32))
  return nn.unbox(params['params'])


@functools.lru_cache(maxsize=None)
def _model(shapes_dir, impl):
  """(params, jitted (params, batch, num_tokens) -> (nll, mask, grads)) with attention `impl`.

  The loss is `losses.loss_fn`'s: the supervised nll summed, over the global token count.
  """
  config = copy.deepcopy(_batches(shapes_dir)[0].model)
  config.attention_impl = impl
  model = lvm.models.build(config)

  @jax.jit
  def run(params, batch, num_tokens):
    def loss(p):
      nll, _, _, mask = losses.token_losses(losses.apply_model(model, p, batch), batch)
      return jnp.sum(jnp.where(mask, nll, 0.0)) / num_tokens, (nll, mask)
    (_, (nll, mask)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return nll, mask, grads
  return _params(shapes_dir), run


def _per_sample(batch, nll, mask):
  """Per-sample sums of the supervised nll, in sample order ([B, L-1] terms)."""
  nll = np.where(mask, np.asarray(nll, np.float64), 0.0)
  if 'segment_ids' not in batch:
    return nll.sum(axis=1)
  seg = batch['segment_ids'][:, 1:]  # the target token's segment
  return np.array([nll[r][seg[r] == s].sum() for r in range(len(nll))
                   for s in range(1, int(seg[r].max()) + 1)])


@pytest.mark.parametrize('impl', ['xla', 'cpu'])
def test_packed_equals_unpacked(shapes_dir, impl):
  config, packed, unpacked = _batches(shapes_dir)
  assert len(unpacked["input_ids"]) >= 2 * ROWS  # it did pack
  assert (packed['segment_ids'].max(axis=1) >= 2).all()
  params, run = _model(shapes_dir, impl)
  # Same supervised targets, and so the same normalizer (per token, over the global batch).
  count = lambda b: int(b['loss_mask'][:, 1:].sum())
  assert count(packed) == count(unpacked)
  num_tokens = jnp.float32(count(packed))
  nll_p, mask_p, g_packed = run(params, packed, num_tokens)
  nll_u, mask_u, g_unpacked = run(params, unpacked, num_tokens)
  np.testing.assert_allclose(_per_sample(packed, nll_p, mask_p),
                             _per_sample(unpacked, nll_u, mask_u), rtol=1e-5, atol=1e-5)
  for path, a in jax.tree_util.tree_leaves_with_path(g_packed):
    b = functools.reduce(lambda t, k: t[k.key], path, g_unpacked)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_segments_keep_attention_apart(shapes_dir):
  """A sample's losses do not move when the other samples of its row change."""
  config, packed, _ = _batches(shapes_dir)
  params, run = _model(shapes_dir, 'xla')
  second = packing.segments_of({k: v[0] for k, v in packed.items()})[1]
  targets = slice(second.start, second.stop - 1)  # positions inside the second sample
  changed = {k: v.copy() for k, v in packed.items()}
  ids = changed['input_ids'][0, :second.start]
  changed['input_ids'][0, :second.start] = np.where(
      ids == config.model.image_token_id, ids, 7)  # the first sample's text replaced
  changed['images'][0, 0] += 1.0  # and its image
  nll = lambda batch: np.asarray(run(params, batch, jnp.float32(1))[0])[0, targets]
  a = nll(packed)
  np.testing.assert_array_equal(a, nll(changed))
  # One segment for the whole row (positions alone): the change leaks into the second sample.
  joined = dict(changed, segment_ids=np.ones_like(changed['segment_ids']))
  assert np.abs(nll(joined) - a).max() > 1e-3
