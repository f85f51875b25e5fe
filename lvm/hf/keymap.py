"""Parameter names and layouts: transformers (LLaVA, CLIP, SigLIP, LLaMA) <-> lvm.

Checkpoint keys are first reduced to a canonical `(part, name)`, where part is one of
'vision', 'projector', 'decoder', 'lm_head', 'image_newline' (LLaVA-NeXT / OneVision) and
name is the key inside that module as transformers' CLIPVisionTransformer / LlamaModel /
LlavaMultiModalProjector spell it.
That absorbs every key layout in use:

  llava-hf (transformers < 4.52)   language_model.model.layers.0...
                                   language_model.lm_head.weight
                                   vision_tower.vision_model.embeddings...
                                   multi_modal_projector.linear_1.weight
  transformers >= 4.52 in memory   model.language_model.layers.0...  lm_head.weight
                                   model.vision_tower.vision_model...
                                   model.multi_modal_projector...
  transformers 5 save_pretrained   language_model.model.layers.0...  vision_tower.embeddings...
  CLIP/SigLIP dual encoders       vision_model.embeddings...          (text_model.* ignored)
  CLIP/SigLIP vision (5.x)        embeddings...  encoder.layers.0...
  decoder folders (every family)  model.layers.0...                   lm_head.weight

lvm paths are '/'-joined in the unscanned layout (`decoder/layers_3/mlp/up_proj/kernel`);
the scanned layout stacks `layers_i` on axis 0 of `layers` (see `stack_layers`).
"""

import re

import numpy as np

# Keys that exist in transformers checkpoints but not in lvm, on purpose: buffers, and the
# vision pooling head / SigLIP post_layernorm, which only feed the pooled output LLaVA never reads.
_IGNORED = re.compile(
    r'(^|\.)position_ids$|rotary_emb\.inv_freq$|^vision:head\.|^vision:post_layernorm\.')


def canonical_llava(key: str) -> tuple[str, str] | None:
  """A LLaVA checkpoint key -> (part, name), or None for keys outside the model."""
  if key in ('lm_head.weight', 'language_model.lm_head.weight'):
    return 'lm_head', 'weight'
  if key in ('image_newline', 'model.image_newline'):  # LLaVA-NeXT / OneVision
    return 'image_newline', 'image_newline'
  for pattern, part in ((r'^(?:model\.)?language_model\.(?:model\.)?(.+)$', 'decoder'),
                        (r'^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$', 'vision'),
                        (r'^(?:model\.)?multi_modal_projector\.(.+)$', 'projector')):
    m = re.match(pattern, key)
    if m:
      return part, m.group(1)
  return None


def canonical_vision(key: str) -> tuple[str, str] | None:
  """A CLIP/SigLIP (vision or dual-encoder) checkpoint key -> ('vision', name) or None."""
  m = re.match(r'^(?:model\.)?(?:vision_tower\.)?(?:vision_model\.)?'
               r'((?:embeddings|encoder|pre_layrnorm|post_layernorm|head)\..+)$', key)
  return ('vision', m.group(1)) if m else None


def canonical_llama(key: str) -> tuple[str, str] | None:
  """A LlamaForCausalLM checkpoint key -> ('decoder' | 'lm_head', name) or None."""
  if key == 'lm_head.weight':
    return 'lm_head', 'weight'
  m = re.match(r'^model\.(.+)$', key)
  return ('decoder', m.group(1)) if m else None


def is_ignored(part: str, name: str) -> bool:
  return bool(_IGNORED.search(f'{part}:{name}'))


def hf_name(path: str) -> tuple[str, str, str, int]:
  """An unscanned lvm param path -> (part, name, transform, n_in).

  transform is 'linear' (torch [out, in] <-> kernel [*in, *out], n_in input dims),
  'conv' (OIHW <-> HWIO), 'vector' (1-D in torch; lvm may split a heads axis) or 'copy'.
  """
  part, *rest = path.split('/')
  if part == 'image_newline':
    return part, part, 'copy', 0
  if part == 'decoder' and rest == ['lm_head', 'kernel']:
    return 'lm_head', 'weight', 'linear', 1
  special = {
      ('vision', 'patch_embedding'): ('embeddings.patch_embedding.weight', 'conv'),
      ('vision', 'patch_bias'): ('embeddings.patch_embedding.bias', 'vector'),
      ('vision', 'class_embedding'): ('embeddings.class_embedding', 'vector'),
      ('vision', 'position_embedding'): ('embeddings.position_embedding.weight', 'copy'),
      ('decoder', 'embed_tokens'): ('embed_tokens.weight', 'copy'),
  }
  if len(rest) == 1 and (part, rest[0]) in special:
    name, transform = special[(part, rest[0])]
    return part, name, transform, 0
  parts = []
  for p in rest[:-1]:
    m = re.fullmatch(r'layers_(\d+)', p)
    if m:
      parts += (['encoder'] if part == 'vision' else []) + ['layers', m.group(1)]
    else:
      parts.append(p)
  leaf = rest[-1]
  if leaf == 'kernel':
    n_in = 2 if parts[-1] in ('o_proj', 'out_proj') else 1  # [heads, head_dim] -> width
    return part, '.'.join(parts + ['weight']), 'linear', n_in
  if leaf in ('scale', 'bias'):
    return part, '.'.join(parts + ['weight' if leaf == 'scale' else 'bias']), 'vector', 0
  raise ValueError(f'No transformers name for lvm parameter {path!r}')


def hf_shape(shape: tuple[int, ...], transform: str, n_in: int) -> tuple[int, ...]:
  """The transformers tensor shape for an lvm array of `shape`."""
  if transform == 'linear':
    return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
  if transform == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == 'vector':
    return (int(np.prod(shape)),)
  return tuple(shape)


def to_lvm(value: np.ndarray, transform: str, n_in: int, shape: tuple[int, ...]) -> np.ndarray:
  """A transformers tensor -> the lvm array of `shape` (ValueError on a shape mismatch)."""
  expected = hf_shape(shape, transform, n_in)
  if tuple(value.shape) != expected:
    raise ValueError(f'expected shape {expected} (from the config), got {tuple(value.shape)}')
  if transform == 'linear':
    value = value.T
  elif transform == 'conv':
    value = value.transpose(2, 3, 1, 0)
  return value.reshape(shape)


def to_hf(value: np.ndarray, transform: str, n_in: int) -> np.ndarray:
  """An lvm array -> the transformers tensor (inverse of `to_lvm`)."""
  if transform == 'linear':
    n = int(np.prod(value.shape[:n_in]))
    return np.ascontiguousarray(value.reshape(n, -1).T)
  if transform == 'conv':
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if transform == 'vector':  # biases and norm weights are 1-D in torch
    return value.reshape(-1)
  return value
