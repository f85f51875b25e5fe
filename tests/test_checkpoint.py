"""Resume after preemption gives the uninterrupted run's losses, also on another mesh."""

import os
import signal

import jax
import numpy as np

from lvm import checkpoint
from lvm import metrics
from lvm import optim
from lvm import train

import synthetic_data  # pylint: disable=import-error
import train_utils  # pylint: disable=import-error


class _SigtermAt(synthetic_data.SyntheticIterator):
  """Sends this process SIGTERM when batch `at` is requested (a preemption)."""
  at = 3

  def __next__(self):
    if self.index == self.at and self.split == 'train':
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def _config(mesh):
  config = train_utils.tiny_config(**{'train.num_steps': 6, 'data.eval_split': '',
                                      'data.test_split': '', 'checkpoint.interval': 100})
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_jsonl(workdir) if r['split'] == 'train'}


def test_preempt_and_resume_on_another_mesh(tmp_path):
  kw = dict(num_examples=synthetic_data.num_examples)
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  train.train_and_evaluate(_config((8, 1, 1)), full, make_iterator=synthetic_data.make_iterator,
                           **kw)
  # SIGTERM while fetching batch 3: step 4 finishes, a checkpoint is written, the run exits.
  make = lambda c, split, mesh, **_: _SigtermAt(c, split, mesh)
  train.train_and_evaluate(_config((8, 1, 1)), parts, make_iterator=make, **kw)
  assert sorted(_losses(parts)) == [1, 2, 3, 4]
  assert sorted(int(d) for d in os.listdir(os.path.join(parts, 'checkpoints'))) == [4]
  # Resume on a different mesh.
  train.train_and_evaluate(_config((2, 2, 2)), parts, make_iterator=synthetic_data.make_iterator,
                           **kw)
  a, b = _losses(full), _losses(parts)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)

  # load_params gives the final parameters with the run's config.
  config, params = checkpoint.load_params(full)
  assert config.train.num_steps == 6
  _, params_b = checkpoint.load_params(os.path.join(parts, 'checkpoints', '6'))
  flat_a, flat_b = optim.flatten(params), optim.flatten(params_b)
  assert flat_a.keys() == flat_b.keys() and 'projector/linear_1/kernel' in flat_a
  for k in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[k]), np.asarray(flat_a[k]), rtol=1e-4,
                               atol=1e-6, err_msg=k)
  assert sorted(os.listdir(full)) >= ['checkpoints', 'config.json', 'metrics.jsonl']
  # Restoring params straight into shardings of another mesh (how config.init.kind=checkpoint
  # starts stage 2 from stage 1).
  mesh = train_utils.mesh_for(config, (2, 4, 1))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*(['fsdp'] if x.shape[0] % 4 == 0 else [])))),
      params)
  _, sharded = checkpoint.load_params(full, target)
  leaf = sharded['decoder']['embed_tokens']
  assert leaf.sharding == target['decoder']['embed_tokens'].sharding
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params['decoder']['embed_tokens']))
