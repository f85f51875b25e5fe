"""LoRA training end to end (lvm.train with LoRA on): only adapters and the projector train,
the optimizer holds state for them alone, checkpoints hold only them, a preempted and
resumed run equals the uninterrupted one bit for bit, and the run exports to transformers
(merged) and to PEFT (base + adapter folder) with lvm's unmerged logits."""

import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

import lvm.hf
from lvm import checkpoint
from lvm import lora
from lvm import metrics
from lvm import models
from lvm import optim
from lvm import train

import synthetic_data  # pylint: disable=import-error
import train_utils  # pylint: disable=import-error

STEPS = 4
TOL = 1e-4


class _SigtermAt(synthetic_data.SyntheticIterator):
  """Sends this process SIGTERM when train batch 2 is requested (a preemption: the run
  saves and stops within a step or two)."""

  def __next__(self):
    if self.index == 2 and self.split == 'train':
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def _config():
  return train_utils.tiny_config(**{
      'lora.enable': True, 'lora.rank': 4, 'lora.alpha': 8.0, 'lora.dropout': 0.1,
      'train.num_steps': STEPS, 'data.eval_split': '', 'data.test_split': '',
      'data.seq_len': 32, 'checkpoint.interval': 100, 'optimizer.lr': 1e-2})


def _losses(workdir):
  return [r['loss'] for r in metrics.read_jsonl(workdir) if r['split'] == 'train']


def _saved_state(step_dir):
  return ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, 'state'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run and one preempted after step 2 then resumed."""
  root = tmp_path_factory.mktemp('lora_runs')
  kw = dict(num_examples=synthetic_data.num_examples)
  full, parts = str(root / 'full'), str(root / 'parts')
  train.train_and_evaluate(_config(), full, make_iterator=synthetic_data.make_iterator, **kw)
  make = lambda c, split, mesh, **_: _SigtermAt(c, split, mesh)
  train.train_and_evaluate(_config(), parts, make_iterator=make, **kw)
  assert len(_losses(parts)) < STEPS, 'the preempted run should stop early'
  train.train_and_evaluate(_config(), parts, make_iterator=synthetic_data.make_iterator, **kw)
  return full, parts


def test_lora_run_trains_and_saves_only_adapters_and_resumes_bit_exact(runs):
  full, parts = runs
  losses = _losses(full)
  assert len(losses) == STEPS and _losses(parts) == losses  # bit for bit, the dropout masks included

  final = _saved_state(os.path.join(full, 'checkpoints', str(STEPS)))
  saved = optim.flatten(final['params'])
  assert all(lora.is_adapter(k) or k.startswith('projector/') for k in saved), sorted(saved)
  assert 'decoder/layers/mlp/down_proj/lora_b' in saved and 'projector/linear_1/kernel' in saved
  assert np.abs(saved['decoder/layers/mlp/down_proj/lora_b']).max() > 0  # trained from zero
  # The optimizer state (Adam's mu and nu) covers exactly the saved trainable parameters.
  opt_floats = sum(np.size(x) for x in jax.tree.leaves(final['opt_state'])
                   if np.ndim(x) > 0)
  assert opt_floats == 2 * sum(np.size(v) for v in saved.values())
  resumed = _saved_state(os.path.join(parts, 'checkpoints', str(STEPS)))
  jax.tree.map(np.testing.assert_array_equal, resumed, final)

  # Loaded for inference, the run is whole: the frozen base (config.init, here the seeded
  # random init) under the trained adapters and projector; the base is untouched.
  config, params = checkpoint.load_params(full)
  flat = optim.flatten(jax.device_get(params))
  config0 = _config()
  init = optim.flatten(jax.device_get(jax.jit(
      lambda r: models.random_params(config0, r, *_dummy(config0)))(
          jax.random.key(config0.train.seed))))
  for k, v in flat.items():
    if k in saved:
      np.testing.assert_array_equal(v, saved[k])
    else:
      np.testing.assert_array_equal(v, init[k], err_msg=k)


def _dummy(config):
  from lvm import state  # pylint: disable=import-outside-toplevel
  return state.dummy_inputs(config, 1)


def _inputs(config):
  batch = synthetic_data.global_batch(config, 'train', 7)
  images, ids = batch['images'][:2], batch['input_ids'][:2]
  ids = np.where(ids == config.model.pad_token_id, 1, ids)  # no padding: every position real
  torch_inputs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      pixel_values=torch.from_numpy(images[:, 0].transpose(0, 3, 1, 2).copy()))
  return images, ids, torch_inputs


def _lvm_logits(workdir, images, ids):
  config, params = checkpoint.load_params(workdir)
  return np.asarray(jax.jit(models.build(config).apply)({'params': params}, images, ids))


def _torch_logits(model, torch_inputs):
  with torch.no_grad():
    return model.eval()(**torch_inputs).logits.float().numpy()


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_export_merges_adapters_with_the_unmerged_logits(runs, tmp_path):
  full, _ = runs
  config = _config()
  images, ids, torch_inputs = _inputs(config)
  ours = _lvm_logits(full, images, ids)
  model_config, merged = lvm.hf.load_converted(full)
  assert not any(lora.is_adapter(k) for k in optim.flatten(merged))
  lvm.hf.save(model_config, merged, str(tmp_path / 'merged'))
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'merged'))
  assert _rel(_torch_logits(hf, torch_inputs), ours) < TOL
  # The adapters matter at this tolerance: without them the logits are farther off.
  _, base = lvm.hf.load_converted(full, merge_adapters=False)
  base_logits = np.asarray(jax.jit(models.build(model_config).apply)(
      {'params': base}, images, ids))
  assert _rel(base_logits, ours) > 10 * TOL


def test_peft_loads_the_adapters_onto_the_exported_base(runs, tmp_path):
  peft = pytest.importorskip('peft')
  from lvm.hf import __main__ as hf_main  # pylint: disable=import-outside-toplevel
  full, _ = runs
  base_dir, adapter_dir = str(tmp_path / 'base'), str(tmp_path / 'adapter')
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS(['lvm.hf', f'--adapters={adapter_dir}'])
  try:
    assert hf_main.main(['lvm.hf', 'export', full, base_dir]) == 0
  finally:
    flags.FLAGS.unparse_flags()
  assert sorted(os.listdir(adapter_dir)) == ['adapter_config.json', 'adapter_model.safetensors']
  config = _config()
  images, ids, torch_inputs = _inputs(config)
  ours = _lvm_logits(full, images, ids)
  base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
  model = peft.PeftModel.from_pretrained(base, adapter_dir)
  got = _torch_logits(model, torch_inputs)
  assert _rel(got, ours) < TOL
  # And PEFT's own merge gives the same model.
  assert _rel(_torch_logits(model.merge_and_unload(), torch_inputs), ours) < TOL
