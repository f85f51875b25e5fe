"""Every decoder family and RoPE type against transformers, on tiny random float32 models.

For each family (llama, qwen2, qwen3, mistral, gemma, gemma2) inside a LLaVA: import logits
(`lvm.hf.load`), export (`lvm.hf.save` -> `from_pretrained`), assembling from a plain decoder
folder (`lvm.hf.assemble`), and greedy generation (`lvm.generate.Generator` against
`generate`). Each RoPE type on a LLaMA. Sliding windows are shorter than the sequences, so
they change the logits (checked). Criterion: max |lvm - torch| / max |torch| < 1e-4.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as F
import lvm.hf
from lvm import config as lvm_config
from lvm import validate
from lvm.generate import Generator
from lvm.hf import configs as hf_configs
import lvm.models

TOL = 1e-4
WINDOW = 8  # shorter than every test sequence

FAMILIES = ('llama', 'qwen2', 'qwen3', 'mistral', 'gemma', 'gemma2')


def text_config(family, rope=None, **overrides):
  """A tiny transformers config of `family`: GQA, head_dim 32 != width / heads for Gemma."""
  kw = dict(vocab_size=F.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=256, pad_token_id=0)
  if rope:
    kw['rope_parameters'] = dict(rope, rope_theta=10000.0)
  cls = {'llama': transformers.LlamaConfig, 'qwen2': transformers.Qwen2Config,
         'qwen3': transformers.Qwen3Config, 'mistral': transformers.MistralConfig,
         'gemma': transformers.GemmaConfig, 'gemma2': transformers.Gemma2Config}[family]
  if family == 'mistral':
    kw.update(sliding_window=WINDOW)
  if family in ('gemma', 'gemma2'):
    kw.update(head_dim=32, tie_word_embeddings=True)
  if family == 'gemma2':  # small caps, so that capping changes the numbers
    kw.update(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
              final_logit_softcapping=1.5)
  kw.update(overrides)
  return cls(**kw)


def randomize(model, scale=0.02):
  """Every parameter moved off its init (norms at 1 or 0, zero biases), seeded by the caller."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * scale)
  return model


def llava(family, rope=None, seed=0, **overrides):
  text = text_config(family, rope, **overrides)
  config = transformers.LlavaConfig(
      vision_config=F.vision_config('clip', depth=2), text_config=text,
      image_token_index=F.IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy='default', tie_word_embeddings=text.tie_word_embeddings)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  return randomize(model, 0.1 if family == 'gemma2' else 0.02)


_cache = {}


def case(name, tmp_path_factory, family=None, rope=None, **overrides):
  """(torch model, HF folder, inputs, torch logits) of a LLaVA on `family`, built once."""
  if name not in _cache:
    model = llava(family or name, rope, **overrides)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    inputs = F.batch(model, (2, 1, 0))
    _cache[name] = (model, folder, inputs, F.torch_logits(model, inputs))
  return _cache[name]


def lvm_logits(model_config, params, inputs):
  model = lvm.models.build(model_config)
  return np.asarray(jax.jit(model.apply)({'params': params}, inputs['images'],
                                         inputs['input_ids'], inputs['attention_mask']))


@pytest.mark.parametrize('family', FAMILIES)
def test_import_logits_match_transformers(family, tmp_path_factory):
  _, folder, inputs, ref = case(family, tmp_path_factory)
  model_config, params = lvm.hf.load(folder)
  assert model_config.decoder.kind == family
  err = F.rel_err(lvm_logits(model_config, params, inputs), ref, inputs['attention_mask'])
  assert err < TOL, f'{family}: relative error {err:.2e}'


@pytest.mark.parametrize('family', FAMILIES)
def test_export_loads_with_from_pretrained(family, tmp_path_factory, tmp_path):
  _, folder, inputs, ref = case(family, tmp_path_factory)
  model_config, params = lvm.hf.load(folder)
  out = str(tmp_path / 'export')
  lvm.hf.save(model_config, params, out)
  assert json.load(open(os.path.join(out, 'config.json')))['text_config']['model_type'] == (
      family)
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  err = F.rel_err(F.torch_logits(back, inputs), ref, inputs['attention_mask'])
  assert err < TOL, f'{family}: exported model differs by {err:.2e}'
  config2, _ = lvm.hf.load(out)
  assert config2.decoder.to_dict() == model_config.decoder.to_dict()


@pytest.mark.parametrize('family', FAMILIES)
def test_assemble_from_plain_decoder_folder(family, tmp_path):
  torch.manual_seed(1)
  clip = randomize(transformers.CLIPVisionModel(F.vision_config('clip', depth=2)).eval())
  lm = randomize(transformers.AutoModelForCausalLM.from_config(text_config(family)).eval())
  clip.save_pretrained(str(tmp_path / 'clip'))
  lm.save_pretrained(str(tmp_path / 'lm'))
  config, params = lvm.hf.assemble(str(tmp_path / 'clip'), str(tmp_path / 'lm'),
                                   scan_layers=family != 'gemma2')
  assert config.decoder.kind == family and config.image_token_id == F.VOCAB
  ids = np.random.default_rng(0).integers(0, F.VOCAB, size=(2, 20)).astype(np.int32)
  ours = np.asarray(lvm.models.build(config).apply({'params': params}, None, ids))
  with torch.no_grad():
    ref = lm(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert F.rel_err(ours[..., :F.VOCAB], ref) < TOL
  if family == 'gemma2':  # Gemma2ForCausalLM caps its logits (a LLaVA on it does not)
    assert config.decoder.final_softcap == 1.5
    config.decoder.final_softcap = 0.0
    plain = np.asarray(lvm.models.build(config).apply({'params': params}, None, ids))
    assert F.rel_err(plain[..., :F.VOCAB], ref) > 1e-3
    with pytest.raises(ValueError, match='final_softcap=1.5 cannot be exported'):
      config.decoder.final_softcap = 1.5
      lvm.hf.save(config, params, str(tmp_path / 'export'))


ROPES = {
    'default': None,
    'linear': dict(rope_type='linear', factor=2.0),
    'dynamic': dict(rope_type='dynamic', factor=2.0),  # with max_position_embeddings 16
    'yarn': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16),
    'yarn_mscale': dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16,
                        beta_fast=16.0, beta_slow=2.0, mscale=2.0, mscale_all_dim=1.0),
    'llama3': dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
}


@pytest.mark.parametrize('rope', sorted(ROPES))
def test_rope_types_match_transformers(rope, tmp_path_factory):
  # Sequences of 48 > 16 = max_position_embeddings: dynamic NTK really grows its base.
  _, folder, inputs, ref = case(f'rope_{rope}', tmp_path_factory, 'llama', ROPES[rope],
                                max_position_embeddings=16)
  model_config, params = lvm.hf.load(folder)
  ours = lvm_logits(model_config, params, inputs)
  err = F.rel_err(ours, ref, inputs['attention_mask'])
  assert err < TOL, f'{rope}: relative error {err:.2e}'
  if ROPES[rope]:  # the scaling changed the logits
    model_config.decoder.rope_scaling = None
    plain = lvm_logits(model_config, params, inputs)
    assert F.rel_err(plain, ref, inputs['attention_mask']) > 1e-3


@pytest.mark.parametrize('family,key,value', [
    ('mistral', 'sliding_window', 0), ('gemma2', 'sliding_window', 0),
    ('gemma2', 'attn_softcap', 0.0),
    ('gemma2', 'query_scale', 0.0), ('gemma', 'embed_scale', False)])
def test_family_switches_change_the_logits(family, key, value, tmp_path_factory):
  """Each switch matters on these inputs: turned off, the logits leave transformers'."""
  _, folder, inputs, ref = case(family, tmp_path_factory)
  model_config, params = lvm.hf.load(folder)
  model_config.decoder[key] = value
  assert F.rel_err(lvm_logits(model_config, params, inputs), ref,
                   inputs['attention_mask']) > 1e-3


def _greedy(model, folder, prompt_len, new_tokens, **decoder_overrides):
  """(lvm tokens, transformers tokens) of a greedy continuation of one prompt with an image;
  `decoder_overrides` change lvm's `model.decoder` only."""
  rng = np.random.default_rng(5)
  p = F.tokens_per_image(model)
  ids = rng.integers(1, F.IMAGE_TOKEN, size=prompt_len).astype(np.int32)
  ids[1:1 + p] = F.IMAGE_TOKEN
  image = rng.normal(size=(F.IMAGE_SIZE, F.IMAGE_SIZE, 3)).astype(np.float32)
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.from_numpy(ids[None].astype(np.int64)),
        attention_mask=torch.ones(1, prompt_len, dtype=torch.int64),
        pixel_values=torch.from_numpy(image.transpose(2, 0, 1)[None].copy()),
        max_new_tokens=new_tokens, do_sample=False, suppress_tokens=[F.IMAGE_TOKEN],
        pad_token_id=0)
  theirs = out[0, prompt_len:].tolist()
  model_config, params = lvm.hf.load(folder)
  model_config.decoder.update(decoder_overrides)
  gen = Generator(model_config, params)
  ours = gen.generate([ids.tolist()], images=[image[None]], max_new_tokens=new_tokens)[0]
  return ours.tokens, theirs


@pytest.mark.parametrize('family', FAMILIES)
def test_greedy_generation_matches_transformers(family, tmp_path_factory):
  # Prompt 24 + 12 new tokens: the cached decode steps reach past the window of 8.
  model, folder, _, _ = case(family, tmp_path_factory)
  ours, theirs = _greedy(model, folder, prompt_len=24, new_tokens=12)
  assert len(theirs) == 12 and ours == theirs
  if family in ('mistral', 'gemma2'):  # the window decides these tokens
    assert _greedy(model, folder, 24, 12, sliding_window=0)[0] != theirs


def test_unsupported_transformers_fields_fail_clearly():
  base = text_config('llama').to_dict()
  with pytest.raises(ValueError, match=r"rope_type='longrope'.*supported: 'default'"):
    hf_configs.decoder_from_hf(dict(base, rope_parameters=dict(
        rope_type='longrope', rope_theta=1e4, short_factor=[1.0], long_factor=[1.0])))
  with pytest.raises(ValueError, match=r'attention_bias=True.*supported: False'):
    hf_configs.decoder_from_hf(dict(base, attention_bias=True))
  with pytest.raises(ValueError, match=r'hidden_act=.gelu.'):
    hf_configs.decoder_from_hf(dict(base, hidden_act='gelu'))
  with pytest.raises(ValueError, match=r'model_type .phi3.'):
    hf_configs.decoder_from_hf(dict(base, model_type='phi3'))
  qwen = text_config('qwen2', use_sliding_window=True, sliding_window=8,
                     max_window_layers=1).to_dict()  # full, then sliding: no lvm pattern
  with pytest.raises(ValueError, match='layer_types'):
    hf_configs.decoder_from_hf(qwen)
  # An lvm config that no transformers class of its family expresses is refused on export.
  d = lvm_config.decoder_config('llama', sliding_window=8)
  with pytest.raises(ValueError, match='sliding_window=8 cannot be exported'):
    hf_configs.decoder_to_hf(d)


def test_validate_names_bad_rope_and_switches():
  config = lvm_config.get_config()
  config.model.decoder.rope_scaling = {'type': 'ntk', 'factor': 2.0}
  config.model.decoder.mlp_act = 'swish'
  with pytest.raises(ValueError) as e:
    validate.validate_config(config, num_devices=8)
  msg = str(e.value)
  assert "model.decoder.rope_scaling: type 'ntk' is not a supported RoPE type" in msg
  assert "'yarn'" in msg and 'model.decoder.mlp_act' in msg
  config.model.decoder.rope_scaling = {'type': 'yarn', 'factor': 2.0}
  config.model.decoder.mlp_act = 'silu'
  with pytest.raises(ValueError, match="'yarn' needs key 'original_max_position_embeddings'"):
    validate.validate_config(config, num_devices=8)
