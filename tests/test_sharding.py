"""Sharded training gives the losses of one device: DP, FSDP, TP, mixed, and 2 processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lvm import sharding

import train_utils  # pylint: disable=import-error

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
# (data, fsdp, tensor). The tiny config (4 heads, 4 kv heads) divides tensor size 4 at most.
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 4), (2, 2, 2)]


@pytest.fixture(scope='module')
def reference():
  config = train_utils.tiny_config()
  losses, _, factory = train_utils.run_steps(config, train_utils.mesh_for(config, (1, 1, 1)))
  return losses, factory.initial_params


def test_mesh_shape_infers_one_axis():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='not divisible'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)


def test_meshes_match_one_device(reference):
  reference, params = reference
  assert len(jax.devices()) >= 8, 'tests/conftest.py should give 8 CPU devices'
  # Random targets over a 512-token vocabulary: the loss starts near log(512).
  assert np.all(np.isfinite(reference)) and abs(reference[0] - np.log(512)) < 0.2
  config = train_utils.tiny_config()
  for shape in MESHES:
    # Sharded random init is checked once (2,2,2); the others start from the same host
    # params, which skips an init compile per mesh.
    losses, state, _ = train_utils.run_steps(
        config, train_utils.mesh_for(config, shape), params=None if shape == (2, 2, 2) else params)
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=f'mesh {shape}')
    # The parameters really are split over the mesh (not replicated by accident).
    kernel = state['params']['decoder']['layers']['mlp']['up_proj']['kernel']
    shard = kernel.addressable_shards[0].data.shape
    if shape[1] > 1 or shape[2] > 1:
      assert np.prod(shard) < np.prod(kernel.shape), (shape, shard)


def test_demo_step_settings_match_one_device():
  """The demo's step (configs/shapes.py: unrolled layers, fused q/k/v and gate/up kernels,
  qk_norm, LM head at the scored positions only) shards like the plain one: the tensor and
  mixed meshes, where the fused kernels are concatenated across sharded heads, give the
  one-device losses."""
  config = train_utils.tiny_config(**{
      'model.scan_layers': False, 'model.fuse_projections': True,
      'model.decoder.qk_norm': True, 'train.max_scored_tokens': 48})
  reference, _, factory = train_utils.run_steps(
      config, train_utils.mesh_for(config, (1, 1, 1)), num_steps=3)
  assert np.all(np.isfinite(reference)) and abs(reference[0] - np.log(512)) < 0.2
  for shape in ((1, 1, 4), (2, 2, 2)):
    losses, _, _ = train_utils.run_steps(config, train_utils.mesh_for(config, shape),
                                         num_steps=3, params=factory.initial_params)
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=f'mesh {shape}')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(reference):
  reference, _ = reference
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'), f'127.0.0.1:{port}', '2',
       str(i), '2,2,2'], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  for out in outputs:
    assert out['devices'] == 8 and out['processes'] == 2
    for shape, losses in out['losses'].items():
      np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=f'2 processes, {shape}')


def test_module_lr_trains_and_shards_its_optimizer_state_like_the_params():
  """Per-module learning rates (optax.multi_transform) under FSDP: the Adam moments of every
  parameter take that parameter's sharding, and a module at lr 0 does not move."""
  config = train_utils.tiny_config(**{'train.stage': 'full'})
  config.optimizer.module_lr = {'^vision/': 0.0}
  config.optimizer.weight_decay = 0.0
  mesh = train_utils.mesh_for(config, (1, 8, 1))
  losses, state, factory = train_utils.run_steps(config, mesh, num_steps=3)
  assert all(np.isfinite(losses))
  params = state['params']
  before = factory.initial_params
  for name in ('vision', 'decoder'):
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(params[name])), jax.tree.leaves(before[name]))]
    assert (any(moved) if name == 'decoder' else not any(moved)), name
  flat_params = {jax.tree_util.keystr(p): (x.shape, x.sharding) for p, x in
                 jax.tree_util.tree_leaves_with_path(params)}
  matched = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state['opt_state']):
    # The parameter's keys end the path (after optax's own `inner_states/default/...`).
    for start in range(len(path)):
      keys = jax.tree_util.keystr(tuple(path[start:]))
      if keys in flat_params and flat_params[keys][0] == leaf.shape:
        assert leaf.sharding.is_equivalent_to(flat_params[keys][1], leaf.ndim), keys
        matched += 1
        break
  assert matched >= 2 * len(flat_params)  # mu and nu of every parameter
