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

STEPS = 3
TOL = 1e-4


class _SigtermAt(synthetic_data.SyntheticIterator):
  """Sends this process SIGTERM when train batch 1 is requested (a preemption: the run
  saves and stops within a step or two)."""

  def __next__(self):
    if self.index == 1 and self.split == 'train':
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
  """An uninterrupted run, one preempted then resumed, and the first one's params loaded
  for inference (`load_params`: the base rebuilt under the saved adapters)."""
  root = tmp_path_factory.mktemp('lora_runs')
  kw = dict(num_examples=synthetic_data.num_examples)
  full, parts = str(root / 'full'), str(root / 'parts')
  train.train_and_evaluate(_config(), full, make_iterator=synthetic_data.make_iterator, **kw)
  make = lambda c, split, mesh, **_: _SigtermAt(c, split, mesh)
  train.train_and_evaluate(_config(), parts, make_iterator=make, **kw)
  assert len(_losses(parts)) < STEPS, 'the preempted run should stop early'
  train.train_and_evaluate(_config(), parts, make_iterator=synthetic_data.make_iterator, **kw)
  config, params = checkpoint.load_params(full)
  apply = jax.jit(models.build(config).apply)
  logits = lambda p, images, ids: np.asarray(apply({'params': p}, images, ids))
  return full, parts, config, jax.device_get(params), logits


def test_lora_run_trains_and_saves_only_adapters_and_resumes_bit_exact(runs):
  full, parts, _, params, _ = runs
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
  flat = optim.flatten(params)
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


def _torch_logits(model, torch_inputs):
  with torch.no_grad():
    return model.eval()(**torch_inputs).logits.float().numpy()


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_export_merges_adapters_with_the_unmerged_logits(runs, tmp_path):
  full, _, config, params, logits = runs
  images, ids, torch_inputs = _inputs(config)
  ours = logits(params, images, ids)
  model_config, merged = lvm.hf.load_converted(full)
  assert not any(lora.is_adapter(k) for k in optim.flatten(merged))
  lvm.hf.save(model_config, merged, str(tmp_path / 'merged'))
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'merged'))
  assert _rel(_torch_logits(hf, torch_inputs), ours) < TOL
  # The adapters matter at this tolerance: with B zeroed the logits are farther off.
  flat = optim.flatten(params)
  zeroed = {k: np.zeros_like(v) if k.endswith('/lora_b') else v for k, v in flat.items()}
  assert _rel(logits(optim.unflatten(zeroed), images, ids), ours) > 10 * TOL


def test_peft_loads_the_adapters_onto_the_exported_base(runs, tmp_path):
  peft = pytest.importorskip('peft')
  from lvm.hf import peft as lvm_peft  # pylint: disable=import-outside-toplevel
  full, _, config, params, logits = runs
  base_dir, adapter_dir = str(tmp_path / 'base'), str(tmp_path / 'adapter')
  lvm_peft.export(full, base_dir, adapter_dir)  # python -m lvm.hf export ... --adapters=
  assert sorted(os.listdir(adapter_dir)) == ['adapter_config.json', 'adapter_model.safetensors']
  images, ids, torch_inputs = _inputs(config)
  ours = logits(params, images, ids)
  base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir)
  model = peft.PeftModel.from_pretrained(base, adapter_dir)
  got = _torch_logits(model, torch_inputs)
  assert _rel(got, ours) < TOL
  # And PEFT's own merge gives the same model.
  assert _rel(_torch_logits(model.merge_and_unload(), torch_inputs), ours) < TOL


def test_generation_with_unmerged_adapters_follows_the_lora_logits(runs):
  from lvm import generate  # pylint: disable=import-outside-toplevel
  _, _, config, params, logits = runs
  images, ids, _ = _inputs(config)
  prompt = [int(t) for t in ids[0, :24]]  # the image's 16 tokens and some text
  generator = generate.Generator(config, params)
  assert generator.model.lora is not None  # the adapters run unmerged
  out = generator.generate([prompt], [images[0]], max_new_tokens=3)[0].tokens
  full = np.asarray([prompt + list(out)], np.int32)
  # Greedy decoding with the cache = the argmax of the full forward pass at each step.
  want = logits(params, images[:1], full)[0, len(prompt) - 1:-1].argmax(-1)
  assert list(out) == list(want), (out, want)
