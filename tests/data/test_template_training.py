"""The shapes demo learns with every decoder family's template (its masks train the answers).

One tiny model (configs/tiny.py on shapes, its own tokenizer, which holds each format's
markers) and one compiled step; each template trains from the same initial parameters on its
own rendering of the data. The loss over the supervised tokens (answers and end-of-turn
tokens) must fall well below where it starts (20 steps: from about 6.2 to 3.4-3.6).
"""

import jax
import numpy as np
import pytest

from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm.data import pipeline
from tests.data.conftest import tiny_shapes_config

TEMPLATES = ('chatml', 'mistral', 'gemma', 'llama3')
STEPS = 20


@pytest.fixture(scope='module')
def losses_by_template(shapes_dir):
  configs = {t: tiny_shapes_config(shapes_dir, template=t, seq_len=96, system_prompt='')
             for t in TEMPLATES}
  config = configs[TEMPLATES[0]]
  config.optimizer.lr = 3e-3
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])  # one device: the cheapest
  model = models.build(config)
  tx, _ = optim.make(config.optimizer, STEPS)
  factory = state_lib.StateFactory(config, model, tx, mesh, sharding.rules(config))
  params = jax.device_get(factory.random_params(jax.random.key(0)))
  step = None
  out = {}
  for template, cfg in configs.items():
    it = pipeline.make_iterator(cfg, 'train', mesh)
    batch = next(it)
    if step is None:  # Same shapes for every template: compiled once.
      step = step_lib.jit_train_step(factory, batch)
    state = factory.from_params(jax.device_put(params, factory.param_shardings))
    losses = []
    for _ in range(STEPS):
      state, metrics = step(state, batch)
      losses.append(float(metrics['loss']))
      batch = next(it)
    out[template] = (losses, it.stats)
  return out


@pytest.mark.parametrize('template', TEMPLATES)
def test_loss_falls_with_each_template(losses_by_template, template):
  losses, drops = losses_by_template[template]
  assert drops == {}  # every sample rendered (and passed its checks)
  first, last = np.mean(losses[:3]), np.mean(losses[-3:])
  assert np.isfinite(losses).all()
  assert last < 0.7 * first, (template, first, last)  # measured: 6.2 -> 3.4-3.6
