"""LoRA over a quantized frozen base (QLoRA-style: `lora.enable` with
`train.frozen_quantization=int8`): the base is stored int8, only adapters and the projector
train, and a preempted run resumes (its base rebuilt from `config.init` and quantized again)
bit for bit."""

import os
import signal

import numpy as np

from lvm import lora
from lvm import metrics
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import train

import synthetic_data  # pylint: disable=import-error
import train_utils  # pylint: disable=import-error

STEPS = 3


class _SigtermAt(synthetic_data.SyntheticIterator):
  """Preempts the run when train batch 1 is requested."""

  def __next__(self):
    if self.index == 1 and self.split == 'train':
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def _config():
  return train_utils.tiny_config(**{
      'lora.enable': True, 'lora.rank': 4, 'lora.alpha': 8.0,
      'train.frozen_quantization': 'int8', 'train.num_steps': STEPS,
      'data.eval_split': '', 'data.test_split': '', 'data.seq_len': 32,
      'checkpoint.interval': 100, 'optimizer.lr': 1e-2})


def _losses(workdir):
  return [r['loss'] for r in metrics.read_jsonl(workdir) if r['split'] == 'train']


def test_lora_on_an_int8_base_trains_and_resumes_bit_exact(tmp_path):
  kw = dict(num_examples=synthetic_data.num_examples)
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  train.train_and_evaluate(_config(), full, make_iterator=synthetic_data.make_iterator,
                                   **kw)
  make = lambda c, split, mesh, **_: _SigtermAt(c, split, mesh)
  train.train_and_evaluate(_config(), parts, make_iterator=make, **kw)
  assert len(_losses(parts)) < STEPS, 'the preempted run should stop early'
  train.train_and_evaluate(_config(), parts, make_iterator=synthetic_data.make_iterator, **kw)
  losses = _losses(full)
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  assert _losses(parts) == losses


def test_lora_base_is_what_int8_quantizes():
  config = _config()
  mesh = train_utils.mesh_for(config, (1, 1, 1))
  tx, _ = optim.make(config.optimizer, 10)
  factory = state_lib.StateFactory(config, models.build(config), tx, mesh,
                                   sharding.rules(config))
  axes = factory.quantized_axes
  assert any(k.startswith('decoder/') for k in axes), sorted(axes)  # the LoRA base
  assert not any(lora.is_adapter(k) or k.startswith('projector/') for k in axes)
