"""transformers config.json (LLaVA, CLIP, SigLIP, LLaMA) <-> lvm model configs.

Values missing from a config.json take transformers' defaults for that class, as
`from_pretrained` would (llava-hf's own files rely on them).
"""

import copy

import ml_collections

from lvm import config as lvm_config


# transformers activation names <-> lvm's (lvm.models.layers.ACTIVATIONS).
_ACT_FROM_HF = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                'quick_gelu': 'quick_gelu', 'silu': 'silu', 'relu': 'relu'}
_ACT_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu',
              'silu': 'silu', 'relu': 'relu'}

# Defaults of CLIPVisionConfig / SiglipVisionConfig / LlamaConfig, and LlavaConfig's own
# default vision tower (CLIP ViT-L/14-336).
_VISION_DEFAULTS = {
    'clip': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32, layer_norm_eps=1e-5,
                 hidden_act='quick_gelu'),
    'siglip': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                   hidden_act='gelu_pytorch_tanh'),
}
_LLAVA_DEFAULT_VISION = dict(model_type='clip_vision_model', hidden_size=1024,
                             intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14)
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu')
# Qwen3 is LLaMA plus an RMSNorm on each head's query and key (lvm's `qk_norm`).
_QWEN3_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                       head_dim=128)


def vision_kind(vision_cfg: dict) -> str:
  model_type = vision_cfg.get('model_type', 'clip_vision_model')
  for kind in ('siglip', 'clip'):
    if model_type in (kind, f'{kind}_vision_model'):
      return kind
  raise ValueError(f'Unsupported vision tower model_type {model_type!r}: lvm has CLIP and SigLIP')


def vision_from_hf(vision_cfg: dict, feature_layer=-2, strategy='default'):
  """A CLIP/SigLIP (vision) config dict -> lvm `model.vision` ConfigDict."""
  if vision_cfg.get('model_type') in ('clip', 'siglip'):  # a dual encoder's config
    vision_cfg = dict(vision_cfg.get('vision_config') or {}, model_type=vision_cfg['model_type'])
  kind = vision_kind(vision_cfg)
  v = {**_VISION_DEFAULTS[kind], **vision_cfg}
  if v['hidden_act'] != _VISION_DEFAULTS[kind]['hidden_act']:
    raise ValueError(f"{kind} vision tower with hidden_act={v['hidden_act']!r} is not supported "
                     f"(lvm's {kind} tower uses {_VISION_DEFAULTS[kind]['hidden_act']})")
  if v.get('num_channels', 3) != 3:
    raise ValueError(f"vision num_channels must be 3, got {v['num_channels']}")
  if strategy not in ('default', 'full'):
    raise ValueError(f'Unknown vision_feature_select_strategy {strategy!r}')
  # 'default' drops token 0: the class token for CLIP, but a real patch for SigLIP.
  select = 'all' if strategy == 'full' else ('patch' if kind == 'clip' else 'drop_first')
  config = lvm_config.vision_config(
      kind, image_size=v['image_size'], patch_size=v['patch_size'], width=v['hidden_size'],
      depth=v['num_hidden_layers'], heads=v['num_attention_heads'],
      mlp_dim=v['intermediate_size'], norm_eps=v['layer_norm_eps'], select=select)
  set_feature_layer(config, feature_layer)
  return config


def set_feature_layer(vision_config, feature_layer):
  """Sets an int or a list (the field is typed `object` in lvm/config.py)."""
  if isinstance(feature_layer, (list, tuple)):
    vision_config.feature_layer = [int(i) for i in feature_layer]
  else:
    vision_config.feature_layer = int(feature_layer)


def _rope_from_hf(text_cfg: dict):
  """(theta, lvm rope_scaling or None) from transformers 5 `rope_parameters` or 4.x keys."""
  params = text_cfg.get('rope_parameters')
  if params:
    theta = params.get('rope_theta', text_cfg.get('rope_theta', 10000.0))
    scaling = params
  else:
    theta = text_cfg.get('rope_theta', 10000.0)
    scaling = text_cfg.get('rope_scaling')
  if not scaling:
    return float(theta), None
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind == 'linear':
    return float(theta), {'type': 'linear', 'factor': float(scaling['factor'])}
  if kind == 'llama3':
    return float(theta), {
        'type': 'llama3', 'factor': float(scaling['factor']),
        'low_freq_factor': float(scaling['low_freq_factor']),
        'high_freq_factor': float(scaling['high_freq_factor']),
        'original_max_position_embeddings': int(scaling['original_max_position_embeddings'])}
  raise ValueError(f"Unsupported rope scaling {kind!r}: lvm has 'linear' and 'llama3'")


def decoder_from_hf(text_cfg: dict, tie_default=False):
  """A LLaMA (or Qwen3) config dict -> lvm `model.decoder` ConfigDict."""
  model_type = text_cfg.get('model_type', 'llama')
  if model_type not in ('llama', 'mistral', 'vicuna', 'qwen3'):
    raise ValueError(f'Unsupported decoder model_type {model_type!r}: lvm has LLaMA and Qwen3')
  qwen3 = model_type == 'qwen3'
  defaults = _QWEN3_DEFAULTS if qwen3 else _LLAMA_DEFAULTS
  t = {**defaults, 'tie_word_embeddings': tie_default, **text_cfg}
  if t['hidden_act'] != 'silu':
    raise ValueError(f"LLaMA hidden_act must be 'silu', got {t['hidden_act']!r}")
  for key in ('attention_bias', 'mlp_bias'):
    if t.get(key):
      raise ValueError(f'LLaMA {key}=True is not supported by lvm')
  if qwen3:  # Qwen configs name a window even when it is off; these two say it is on
    sliding = t.get('use_sliding_window') or 'sliding_attention' in (t.get('layer_types') or ())
  else:
    sliding = t.get('sliding_window')
  if sliding:
    raise ValueError('sliding-window attention is not supported by lvm')
  heads = t['num_attention_heads']
  head_dim = t.get('head_dim') or t['hidden_size'] // heads
  theta, scaling = _rope_from_hf(t)
  return lvm_config.decoder_config(
      vocab_size=t['vocab_size'], width=t['hidden_size'], depth=t['num_hidden_layers'],
      heads=heads, kv_heads=t.get('num_key_value_heads') or heads,
      head_dim=0 if head_dim * heads == t['hidden_size'] else head_dim,
      mlp_dim=t['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
      norm_eps=t['rms_norm_eps'], tie_embeddings=bool(t['tie_word_embeddings']), qk_norm=qwen3)


def model_config(vision, projector, decoder, image_token_id, pad_token_id, **overrides):
  """An lvm `config.model` from parts; float32 compute unless overridden."""
  config = copy.deepcopy(lvm_config.get_config().model)
  config.vision, config.projector, config.decoder = vision, projector, decoder
  config.image_token_id = int(image_token_id)
  config.pad_token_id = int(pad_token_id)
  config.dtype = 'float32'
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f'Unknown model config key {key!r}; known: {sorted(config)}')
    config[key] = value
  return config


def llava_from_hf(cfg: dict, **overrides):
  """A LlavaConfig dict (config.json) -> lvm `config.model`."""
  if cfg.get('model_type') != 'llava':
    raise ValueError(f"Expected a LLaVA config (model_type 'llava'), got {cfg.get('model_type')!r}")
  text_cfg = cfg.get('text_config') or {}
  vision = vision_from_hf(cfg.get('vision_config') or dict(_LLAVA_DEFAULT_VISION),
                          cfg.get('vision_feature_layer', -2),
                          cfg.get('vision_feature_select_strategy', 'default'))
  act = cfg.get('projector_hidden_act', 'gelu')
  if act not in _ACT_FROM_HF:
    raise ValueError(f'Unsupported projector_hidden_act {act!r}')
  projector = lvm_config.projector_config(f'mlp2x_{_ACT_FROM_HF[act]}',
                                      bias=bool(cfg.get('multimodal_projector_bias', True)))
  decoder = decoder_from_hf(text_cfg, tie_default=cfg.get('tie_word_embeddings', False))
  image_token_id = cfg.get('image_token_id', cfg.get('image_token_index', 32000))
  pad = cfg.get('pad_token_id', text_cfg.get('pad_token_id'))
  # LLaVA pads with <unk> (id 0) when the tokenizer has no pad token.
  return model_config(vision, projector, decoder, image_token_id, 0 if pad is None else pad,
                      **overrides)


def vision_to_hf(v) -> dict:
  if v.kind == 'clip':
    out = dict(model_type='clip_vision_model', hidden_act='quick_gelu')
  else:
    out = dict(model_type='siglip_vision_model', hidden_act='gelu_pytorch_tanh',
               vision_use_head=False)
  out.update(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
             num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
             layer_norm_eps=v.norm_eps, num_channels=3, attention_dropout=0.0)
  return out


def decoder_to_hf(d) -> dict:
  head_dim = d.head_dim or d.width // d.heads
  rope = {'rope_type': 'default', 'rope_theta': float(d.rope_theta)}
  scaling = dict(d.rope_scaling) if d.rope_scaling else None
  if scaling:
    scaling['rope_type'] = scaling.pop('type')
    rope.update(scaling)
  extra = dict(model_type='qwen3', use_sliding_window=False) if d.get('qk_norm') else dict(
      model_type='llama', mlp_bias=False)
  return dict(
      **extra, vocab_size=d.vocab_size, hidden_size=d.width,
      intermediate_size=d.mlp_dim, num_hidden_layers=d.depth, num_attention_heads=d.heads,
      num_key_value_heads=d.kv_heads, head_dim=head_dim, hidden_act='silu',
      rms_norm_eps=d.norm_eps, rope_parameters=rope, rope_theta=float(d.rope_theta),
      rope_scaling=scaling, attention_bias=False,
      tie_word_embeddings=bool(d.tie_embeddings), max_position_embeddings=4096,
      bos_token_id=1, eos_token_id=2)


def llava_to_hf(config) -> dict:
  """lvm `config.model` -> a LlavaConfig dict that transformers loads."""
  v = config.vision
  from lvm.models import projector as projector_lib  # pylint: disable=g-import-not-at-top
  family, depth, act = projector_lib.parse_kind(config.projector.kind)
  if family != 'mlp' or depth != 2:
    raise ValueError(f'transformers LLaVA has only the 2-layer MLP projector; cannot export '
                     f'projector {config.projector.kind!r}')
  if v.select == 'all':
    strategy = 'full'
  elif v.select == 'drop_first' or v.kind == 'clip':
    strategy = 'default'
  else:  # SigLIP with 'patch' keeps every token
    strategy = 'full'
  layer = v.feature_layer
  layer = [int(i) for i in layer] if isinstance(layer, (list, tuple)) else int(layer)
  text = decoder_to_hf(config.decoder)
  return dict(
      architectures=['LlavaForConditionalGeneration'], model_type='llava',
      vision_config=vision_to_hf(v), text_config=text, image_token_index=config.image_token_id,
      image_token_id=config.image_token_id, pad_token_id=config.pad_token_id,
      projector_hidden_act=_ACT_TO_HF[act], multimodal_projector_bias=bool(config.projector.bias),
      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
      image_seq_length=None, tie_word_embeddings=text['tie_word_embeddings'], dtype='float32')


# model_type -> the transformers architecture of an anyres LLaVA.
ANYRES_ARCHITECTURES = {'llava_next': 'LlavaNextForConditionalGeneration',
                        'llava_onevision': 'LlavaOnevisionForConditionalGeneration'}
# LlavaOnevisionConfig's defaults where they differ from LlavaNextConfig's.
_ONEVISION_DEFAULTS = dict(vision_feature_layer=-1, vision_feature_select_strategy='full',
                           vision_aspect_ratio='anyres_max_9')


def anyres_from_hf(cfg: dict, **overrides):
  """A LlavaNextConfig / LlavaOnevisionConfig dict -> lvm `config.model` with `anyres` set.

  The tower, projector and decoder translate as `llava_from_hf`; `image_grid_pinpoints`,
  OneVision's `vision_aspect_ratio` and `image_newline` make it anyres.
  """
  model_type = cfg.get('model_type')
  if model_type not in ANYRES_ARCHITECTURES:
    raise ValueError(f'Expected a LLaVA-NeXT or OneVision config, got {model_type!r}')
  if model_type == 'llava_onevision':
    cfg = {**_ONEVISION_DEFAULTS, **cfg}
    if 'vision_config' not in cfg:
      raise ValueError('a OneVision config.json without vision_config is not supported')
  pinpoints = cfg.get('image_grid_pinpoints') or [[336, 672], [672, 336], [672, 672],
                                                  [1008, 336], [336, 1008]]
  model_config = llava_from_hf({**cfg, 'model_type': 'llava'}, **overrides)
  model_config.anyres.pinpoints = [[int(h), int(w)] for h, w in pinpoints]
  model_config.anyres.vision_aspect_ratio = (cfg['vision_aspect_ratio']
                                             if model_type == 'llava_onevision' else 'anyres')
  return model_config


def anyres_to_hf(config) -> dict:
  """lvm `config.model` with `anyres` set -> a LlavaNext ('anyres') or LlavaOnevision
  ('anyres_max_N') config dict that transformers loads."""
  out = llava_to_hf(config)
  onevision = config.anyres.vision_aspect_ratio != 'anyres'
  model_type = 'llava_onevision' if onevision else 'llava_next'
  out.update(architectures=[ANYRES_ARCHITECTURES[model_type]], model_type=model_type,
             image_grid_pinpoints=[[int(h), int(w)] for h, w in config.anyres.pinpoints])
  if onevision:
    out['vision_aspect_ratio'] = config.anyres.vision_aspect_ratio
  out.pop('image_seq_length', None)
  return out
