"""LoRA adapters as a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`).

`peft.PeftModel.from_pretrained(base, folder)` loads it onto the transformers model that
`lvm.hf.save` wrote of the same run's params without their adapters (`lvm.lora.strip`: the
frozen base with the modules trained in full), and gives lvm's unmerged logits.

PEFT names a LoRA weight by the module's path in the loaded transformers model (transformers
5: `model.language_model.layers.0.self_attn.q_proj`), prefixed `base_model.model.` and
suffixed `lora_A.weight` (float[r, in]) / `lora_B.weight` (float[out, r]); its scaling is
`lora_alpha / r` (`use_rslora`: `/ sqrt(r)`), as lvm's.
"""

import json

from etils import epath
import jax
import numpy as np

from lvm import lora
from lvm import optim
from lvm.hf import io
from lvm.hf import keymap
from lvm.models.layout import unstack_layers

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'

# lvm part -> the module prefix in transformers' LlavaForConditionalGeneration (5.x).
_MODULE_PREFIX = {'decoder': 'model.language_model.', 'vision': 'model.vision_tower.vision_model.',
                  'projector': 'model.multi_modal_projector.', 'lm_head': ''}


def module_name(path: str) -> str:
  """An unscanned lvm Dense path (`decoder/layers_0/mlp/up_proj`) -> the transformers module
  name (`model.language_model.layers.0.mlp.up_proj`)."""
  part, name, transform, _ = keymap.hf_name(path + '/kernel')
  if transform != 'linear':
    raise ValueError(f'{path}: PEFT LoRA covers linear layers only, not {transform!r}')
  if part == 'lm_head':
    return 'lm_head'
  return _MODULE_PREFIX[part] + name[:-len('.weight')]


def adapter_tensors(params) -> tuple[dict[str, np.ndarray], list[str]]:
  """PEFT's tensors of the adapters in `params`, and the module names they adapt."""
  flat = {k: np.asarray(jax.device_get(v)) for k, v in
          optim.flatten(params).items() if lora.is_adapter(k)}
  if any('/layers/' in k for k in flat):
    flat = unstack_layers(flat)
  tensors, modules = {}, []
  for key in sorted(flat):
    if not key.endswith('/lora_a'):
      continue
    base = key[:-len('/lora_a')]
    _, _, _, n_in = keymap.hf_name(base + '/kernel')
    name = module_name(base)
    modules.append(name)
    tensors[f'base_model.model.{name}.lora_A.weight'] = keymap.to_hf(flat[key], 'linear', n_in)
    tensors[f'base_model.model.{name}.lora_B.weight'] = keymap.to_hf(
        flat[base + '/lora_b'], 'linear', 1)
  return tensors, modules


def save(config, params, out_dir: str, base_model: str = '') -> epath.Path:
  """Writes the adapters of a LoRA run's `params` as a PEFT folder.

  Args:
    config: the run's config (`config.lora`: rank, alpha, dropout, rslora).
    params: its params, adapters included (any placement).
    out_dir: the folder (created; its adapter files replaced).
    base_model: written as `base_model_name_or_path` (the exported base folder).

  Raises:
    ValueError: LoRA is off in `config`, or `params` hold no adapters.
  """
  s = lora.spec(config)
  if s is None:
    raise ValueError('--adapters: this run has no LoRA adapters (config.lora.enable is False)')
  tensors, modules = adapter_tensors(params)
  if not tensors:
    raise ValueError('--adapters: the checkpoint holds no adapter (lora_a/lora_b) parameters')
  adapter_config = {
      'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_model,
      'r': s.rank, 'lora_alpha': s.alpha, 'lora_dropout': s.dropout, 'use_rslora': s.rslora,
      'target_modules': modules, 'bias': 'none', 'fan_in_fan_out': False,
      'init_lora_weights': True, 'inference_mode': True, 'modules_to_save': None,
  }
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  io.write_file(str(out / WEIGHTS_FILE), {k: v.astype(np.float32) for k, v in tensors.items()},
                metadata={'format': 'pt'})
  (out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
  return out


def export(ckpt_dir: str, hf_dir: str, adapter_dir: str, overwrite: bool = False):
  """`python -m lvm.hf export CKPT_DIR HF_DIR --adapters=ADAPTER_DIR`: the run's base weights
  (its fully trained modules included, adapters left out) as a transformers folder, and its
  adapters as a PEFT folder whose `base_model_name_or_path` is that folder.

  Returns:
    (model config, the exported base params).
  """
  from lvm import checkpoint  # pylint: disable=import-outside-toplevel
  import lvm.hf  # pylint: disable=import-outside-toplevel
  config, params = checkpoint.load_params(ckpt_dir)
  params = jax.tree.map(np.asarray, params)
  if lora.spec(config) is None:  # before writing anything
    raise ValueError(f'--adapters: {ckpt_dir} is not a LoRA run (config.lora.enable is False)')
  base = lora.strip(params)
  lvm.hf.save(config.model, base, hf_dir, overwrite=overwrite)
  save(config, params, adapter_dir, base_model=str(hf_dir))
  return config.model, base
