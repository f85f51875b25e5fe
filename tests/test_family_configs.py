"""configs/llama3.py and configs/llava_onevision.py: every stage and size validates, the full-size
models have transformers' parameter counts, and their tokenizers must fit their templates."""

import os

import jax
import numpy as np
import pytest

from configs import llama3
from configs import llava_onevision
from lvm import models
from lvm import validate
from lvm.hf import configs as hf_configs
from tests.data.test_family_templates import build_folder

CONFIGS = {'llama3': llama3, 'llava_onevision': llava_onevision}


def filled(module, arg):
  """The config with the user's folders set (as test_validate does for llava15)."""
  config = module.get_config(arg)
  config.data.manual_dir = '/data/llava'
  config.init.path = config.init.vision_path = config.init.decoder_path = '/ckpt'
  return config


@pytest.mark.parametrize('arg', ['stage=pretrain', 'stage=finetune', 'size=tiny',
                                 'size=tiny,stage=pretrain'])
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_every_stage_and_size_validates(name, arg):
  config = filled(CONFIGS[name], arg)
  validate.validate_config(config, 64 if 'tiny' not in arg else 8)
  want = {'llama3': ('plain', 'llama3'), 'llava_onevision': ('plain', 'chatml')}[name]
  assert config.data.template == want['finetune' in arg or 'stage' not in arg]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_full_size_parameter_count_equals_transformers(name):
  """lvm's abstract parameters vs transformers' model of the exported config (meta device)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = CONFIGS[name].get_config()
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.abstract_params(config.model)))
  if config.model.anyres.pinpoints:
    hf_config = hf_configs.anyres_to_hf(config.model)
    cls = transformers.LlavaOnevisionForConditionalGeneration
  else:
    hf_config = hf_configs.llava_to_hf(config.model)
    hf_config['image_seq_length'] = models.num_image_tokens(config.model)
    cls = transformers.LlavaForConditionalGeneration
  with torch.device('meta'):
    hf = cls(cls.config_class.from_dict(hf_config))
  # SigLIP's post_layernorm only feeds its pooled output, which LLaVA never reads: lvm's
  # SigLIP tower does not hold it (its CLIP tower does, for the checkpoint layout).
  theirs = sum(p.numel() for n, p in hf.named_parameters()
               if not (config.model.vision.kind == 'siglip' and 'post_layernorm' in n))
  assert ours == theirs
  # The decoders' published shapes: Llama-3-8B and Qwen2-7B (8.03e9 and 7.62e9 parameters
  # on their model cards, at the tokenizers' 128256 / 152064 vocabulary sizes).
  d = config.model.decoder
  decoder = sum(p.numel() for n, p in hf.named_parameters()
                if 'language_model' in n or n.startswith('lm_head'))
  vocab = {'llama3': 128256, 'llava_onevision': 152064}[name]
  unpadded = decoder - 2 * (d.vocab_size - vocab) * d.width
  assert round(unpadded / 1e9, 2) == {'llama3': 8.03, 'llava_onevision': 7.62}[name]


@pytest.mark.parametrize('name,family', [('llama3', 'llama3'), ('llava_onevision', 'qwen2')])
def test_tokenizer_must_fit_the_template(name, family, tmp_path):
  config = filled(CONFIGS[name], 'size=tiny')
  config.data.tokenizer = os.path.join(build_folder(tmp_path, family), 'tokenizer.json')
  validate.validate_config(config, 8)
  other = {'llama3': 'qwen2', 'qwen2': 'llama3'}[family]
  config.data.tokenizer = os.path.join(build_folder(tmp_path, other), 'tokenizer.json')
  with pytest.raises(ValueError, match=rf"config.data.template: .*Fix: set config.data.template "
                                       rf"to one this config.data.tokenizer supports: .*"
                                       rf"'{'chatml' if other == 'qwen2' else 'llama3'}'"):
    validate.validate_config(config, 8)
