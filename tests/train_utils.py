"""Helpers shared by the training tests: run a few train steps on a given mesh."""

import jax
import numpy as np

from configs import tiny
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib

import synthetic_data  # pylint: disable=import-error


def tiny_config(**overrides):
  """configs/tiny.py with kv_heads=4 (so tensor parallelism up to 4 divides it)."""
  config = tiny.get_config('kv_heads=4')
  config.train.eval_batches = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def mesh_for(config, shape, devices=None):
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  n = int(np.prod(shape))
  devices = jax.devices()[:n] if devices is None else devices
  return sharding.make_mesh(config.mesh, devices)


def run_steps(config, mesh, num_steps=5, accum_steps=1, params=None):
  """Trains `num_steps` on synthetic batches; returns (losses, final state, factory).

  Args:
    params: host (numpy) params to start from; default: random init on this mesh.
  """
  model = models.build(config)
  tx, _ = optim.make(config.optimizer, max(config.train.num_steps, num_steps))
  factory = state_lib.StateFactory(config, model, tx, mesh, sharding.rules(config))
  if params is None:
    params = factory.random_params(jax.random.key(config.train.seed))
  else:
    params = jax.device_put(params, factory.param_shardings)
  state = factory.from_params(params)
  batches = synthetic_data.SyntheticIterator(config, 'train', mesh)
  first = next(batches)
  step = step_lib.jit_train_step(factory, first, accum_steps=accum_steps)
  losses = []
  batch = first
  # The caller may want the initial params (for comparisons): hand back a host copy.
  factory.initial_params = jax.device_get(state['params'])
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    batch = next(batches)
  return losses, state, factory
