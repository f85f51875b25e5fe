"""transformers config.json (LLaVA, CLIP, SigLIP; LLaMA, Mistral, Qwen2/3, Gemma 1/2) <->
lvm model configs.

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


# transformers' config defaults of each decoder class (for keys a config.json leaves out),
# where they matter to lvm.
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu',
                       max_position_embeddings=2048)
_HF_DEFAULTS = {
    'llama': _LLAMA_DEFAULTS,
    'mistral': dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                    sliding_window=4096, max_position_embeddings=131072),
    'qwen2': dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
    'qwen3': dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, head_dim=128,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  max_position_embeddings=32768),
    'gemma': dict(_LLAMA_DEFAULTS, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, head_dim=256,
                  tie_word_embeddings=True, hidden_act='gelu_pytorch_tanh',
                  max_position_embeddings=8192),
    'gemma2': dict(_LLAMA_DEFAULTS, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, tie_word_embeddings=True, hidden_activation='gelu_pytorch_tanh',
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096,
                   max_position_embeddings=8192),
}
# transformers model_type -> lvm decoder family.
_FAMILIES = {'llama': 'llama', 'vicuna': 'llama', 'mistral': 'mistral', 'qwen2': 'qwen2',
             'qwen3': 'qwen3', 'gemma': 'gemma', 'gemma2': 'gemma2'}
# transformers keys that change the computation, with the value lvm supports where a family
# does not read them (a config setting another value is refused, naming the key).
_NEUTRAL = {'attention_bias': False, 'mlp_bias': False, 'partial_rotary_factor': 1.0,
            'pretraining_tp': 1, 'attn_logit_softcapping': None,
            'final_logit_softcapping': None, 'use_bidirectional_attention': None,
            'use_qk_norm': None, 'attention_chunk_size': None, 'no_rope_layers': None}
# Keys each family reads itself (so they are not held to `_NEUTRAL`).
_READS = {'qwen2': ('attention_bias',),
          'gemma2': ('attn_logit_softcapping', 'final_logit_softcapping')}
_ROPE_KEYS = {'linear': ('factor',),
              'dynamic': ('factor',),
              'yarn': ('factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow',
                       'attention_factor', 'mscale', 'mscale_all_dim', 'truncate'),
              'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                         'original_max_position_embeddings')}


def _rope_from_hf(t: dict):
  """(theta, lvm rope_scaling or None) from transformers 5 `rope_parameters` or 4.x keys."""
  params = t.get('rope_parameters')
  if params:
    theta = params.get('rope_theta', t.get('rope_theta', 10000.0))
    scaling = params
  else:
    theta = t.get('rope_theta', 10000.0)
    scaling = t.get('rope_scaling')
  if not scaling:
    return float(theta), None
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind not in _ROPE_KEYS:
    raise ValueError(f'text_config.rope_parameters.rope_type={kind!r} is not supported by lvm; '
                     f"supported: 'default', {', '.join(repr(k) for k in _ROPE_KEYS)}")
  if scaling.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError('text_config.rope_parameters.partial_rotary_factor='
                     f"{scaling['partial_rotary_factor']} is not supported by lvm (only 1.0)")
  out = {'type': kind, **{k: scaling[k] for k in _ROPE_KEYS[kind]
                          if scaling.get(k) is not None}}
  if kind == 'dynamic':  # NTK grows the base past the trained length, max_position_embeddings
    out['original_max_position_embeddings'] = int(t['max_position_embeddings'])
  return float(theta), out


def _sliding_from_hf(t: dict, family: str) -> tuple[int, int]:
  """(sliding_window, global_every) from `layer_types` or the family's own keys."""
  depth = t['num_hidden_layers']
  types = t.get('layer_types')
  if not types:
    if family == 'mistral':
      slides = [bool(t.get('sliding_window'))] * depth
    elif family == 'gemma2':
      slides = [bool((i + 1) % 2) for i in range(depth)]
    elif family in ('qwen2', 'qwen3') and t.get('use_sliding_window'):
      slides = [i >= t['max_window_layers'] for i in range(depth)]
    else:
      slides = [False] * depth
  else:
    unknown = sorted(set(types) - {'full_attention', 'sliding_attention'})
    if unknown or len(types) != depth:
      raise ValueError(f'text_config.layer_types={types} is not supported by lvm: it takes '
                       f"{depth} of 'full_attention' | 'sliding_attention'")
    slides = [x == 'sliding_attention' for x in types]
  if not any(slides):
    return 0, 0
  if not t.get('sliding_window'):
    raise ValueError('text_config.layer_types has sliding layers but sliding_window is '
                     f"{t.get('sliding_window')!r}")
  for every in [0] + list(range(2, depth + 1)):
    if slides == [not every or bool((i + 1) % every) for i in range(depth)]:
      return int(t['sliding_window']), every
  raise ValueError(f'text_config.layer_types={t.get("layer_types")} (sliding layers {slides}) is '
                   'not supported by lvm: every layer sliding, or every N-th layer global '
                   '(layer i global iff (i + 1) % N == 0)')


def decoder_from_hf(text_cfg: dict, tie_default=False):
  """A decoder config dict (llama, mistral, qwen2, qwen3, gemma, gemma2) -> lvm
  `model.decoder` ConfigDict.

  Raises:
    ValueError: an unsupported model_type, or a key whose value lvm does not compute,
      named with what lvm supports.
  """
  model_type = text_cfg.get('model_type', 'llama')
  if model_type not in _FAMILIES:
    raise ValueError(f'Unsupported decoder model_type {model_type!r}; lvm has '
                     f'{sorted(_FAMILIES)}')
  family = _FAMILIES[model_type]
  t = {**_HF_DEFAULTS[model_type if model_type in _HF_DEFAULTS else family],
       'tie_word_embeddings': tie_default, **text_cfg}
  if family == 'gemma2':
    act = t.get('hidden_activation') or t.get('hidden_act')
  else:
    act = t['hidden_act']
  want_act = 'gelu_pytorch_tanh' if family.startswith('gemma') else 'silu'
  if act != want_act:
    raise ValueError(f'text_config.hidden_act={act!r} is not supported for {model_type}: lvm '
                     f'runs {want_act!r}')
  for key, neutral in _NEUTRAL.items():
    if key not in _READS.get(family, ()) and t.get(key, neutral) not in (neutral, None):
      raise ValueError(f'text_config.{key}={t[key]!r} is not supported by lvm for {model_type}'
                       f' (supported: {neutral!r})')
  if family == 'qwen2' and t.get('attention_bias') is False:
    raise ValueError('text_config.attention_bias=False is not supported for qwen2 (its q/k/v '
                     'always carry biases in transformers)')
  heads = t['num_attention_heads']
  head_dim = t.get('head_dim') or t['hidden_size'] // heads
  theta, scaling = _rope_from_hf(t)
  window, every = _sliding_from_hf(t, family)
  fields = dict(
      vocab_size=t['vocab_size'], width=t['hidden_size'], depth=t['num_hidden_layers'],
      heads=heads, kv_heads=t.get('num_key_value_heads') or heads,
      head_dim=0 if head_dim * heads == t['hidden_size'] else head_dim,
      mlp_dim=t['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
      norm_eps=t['rms_norm_eps'], tie_embeddings=bool(t['tie_word_embeddings']),
      sliding_window=window, global_every=every)
  if family == 'gemma2':
    fields.update(query_scale=float(t['query_pre_attn_scalar']),
                  attn_softcap=float(t.get('attn_logit_softcapping') or 0.0),
                  final_softcap=float(t.get('final_logit_softcapping') or 0.0))
  return lvm_config.decoder_config(family, **fields)


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
  # transformers' LLaVA computes the logits with its own head and caps none of them, whatever
  # the text config says (Gemma2ForCausalLM and PaliGemma do cap them).
  decoder.final_softcap = 0.0
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


# The lvm decoder fields a family's transformers class fixes (so an lvm config that sets
# them otherwise has no transformers class to go to).
_SWITCHES = ('qk_norm', 'attention_bias', 'norm_offset', 'mlp_act', 'embed_scale',
             'query_scale', 'attn_softcap', 'final_softcap', 'sliding_window', 'global_every',
             'post_norms')


def decoder_to_hf(d) -> dict:
  """lvm `model.decoder` -> the transformers text config dict of its family.

  Raises:
    ValueError: a field the family's transformers class cannot express (e.g. a sliding
      window on a LLaMA), named with its value.
  """
  family = d.kind
  if family == 'llama' and d.qk_norm:
    family = 'qwen3'  # LLaMA with qk_norm is exactly Qwen3 in transformers
  head_dim = d.head_dim or d.width // d.heads
  rope = {'rope_type': 'default', 'rope_theta': float(d.rope_theta)}
  scaling = dict(d.rope_scaling) if d.rope_scaling else None
  max_len = 4096
  if scaling:
    scaling['rope_type'] = scaling.pop('type')
    if scaling['rope_type'] == 'dynamic':  # transformers reads the trained length here
      max_len = int(scaling.pop('original_max_position_embeddings'))
    rope.update(scaling)
  window = d.sliding_window or None
  out = dict(model_type=family, vocab_size=d.vocab_size, hidden_size=d.width,
             intermediate_size=d.mlp_dim, num_hidden_layers=d.depth,
             num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, head_dim=head_dim,
             hidden_act=_ACT_TO_HF.get(d.mlp_act, d.mlp_act), rms_norm_eps=d.norm_eps,
             rope_parameters=rope, rope_theta=float(d.rope_theta), rope_scaling=scaling,
             tie_word_embeddings=bool(d.tie_embeddings), max_position_embeddings=max_len,
             bos_token_id=1, eos_token_id=2)
  if family == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  elif family in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=False, sliding_window=None)
  elif family == 'mistral':
    out.update(sliding_window=window)
  elif family == 'gemma2':
    out.update(hidden_activation=out['hidden_act'],
               query_pre_attn_scalar=_int_if_whole(d.query_scale),
               attn_logit_softcapping=d.attn_softcap or None,
               final_logit_softcapping=d.final_softcap or None, sliding_window=window,
               layer_types=['sliding_attention' if slides else 'full_attention'
                            for slides in _sliding_layers(d)])
  back = decoder_from_hf(out)
  for key in _SWITCHES:
    if back[key] != d[key]:
      raise ValueError(f'model.decoder.{key}={d[key]!r} cannot be exported: transformers\' '
                       f'{family} has {key}={back[key]!r} (set model.decoder.kind to the '
                       'family that has it)')
  return out


def _int_if_whole(x):
  return int(x) if float(x).is_integer() else float(x)  # transformers types some ints


def _sliding_layers(d) -> list[bool]:
  if not d.sliding_window:
    return [False] * d.depth
  return [not d.global_every or bool((i + 1) % d.global_every) for i in range(d.depth)]


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
  if config.decoder.final_softcap:
    raise ValueError(f'model.decoder.final_softcap={config.decoder.final_softcap} cannot be '
                     "exported: transformers' LlavaForConditionalGeneration caps no logits. Set "
                     'it to 0 to export (the greedy argmax is the same; the logits are not)')
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
