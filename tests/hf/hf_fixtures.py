"""Tiny transformers LLaVA models with random weights, and inputs shared by lvm and torch.

Every model here is built locally from a config (no download), seeded, and saved as
safetensors, so the tests compare lvm with transformers' own implementation.
"""

import numpy as np
import torch
import transformers

IMAGE_TOKEN = 500
VOCAB = 512
IMAGE_SIZE = 32
PATCH = 8


def vision_config(kind='clip', depth=3):
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH)
  if kind == 'clip':
    return transformers.CLIPVisionConfig(**kw)
  return transformers.SiglipVisionConfig(**kw)


def text_config(kv_heads=2, tie=False, rope=None, head_dim=None, qwen3=False):
  """A LlamaConfig, or with `qwen3` a Qwen3Config (LLaMA with per-head q/k RMSNorm)."""
  kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
            tie_word_embeddings=tie, max_position_embeddings=256, pad_token_id=0)
  if head_dim:
    kw['head_dim'] = head_dim
  if rope:
    kw['rope_parameters'] = dict(rope, rope_theta=10000.0)
  if qwen3:
    return transformers.Qwen3Config(**kw)
  return transformers.LlamaConfig(**kw)


def llava(vision='clip', kv_heads=2, feature_layer=-2, strategy='default', tie=False, rope=None,
          seed=0, head_dim=None):
  """A LlavaForConditionalGeneration in float32 eval mode, seeded."""
  config = transformers.LlavaConfig(
      vision_config=vision_config(vision), text_config=text_config(kv_heads, tie, rope, head_dim),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
      vision_feature_select_strategy=strategy, tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  # The default init leaves norms at 1/0 and biases at 0; randomize everything so a
  # swapped scale/bias or a dropped bias cannot pass unnoticed.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model


def tokens_per_image(model) -> int:
  c = model.config
  n = (IMAGE_SIZE // PATCH) ** 2
  if c.vision_config.model_type == 'clip_vision_model':
    n += 1
  return n - (1 if c.vision_feature_select_strategy == 'default' else 0)


def batch(model, images_per_row=(2, 1, 0), seq_len=48, seed=0, pad=(0, 5, 9)):
  """Inputs for a batch whose rows hold different numbers of images and right padding.

  Returns:
    dict with lvm inputs (images [B, N, H, W, 3], input_ids, attention_mask) and torch
    inputs (pixel_values [sum images, 3, H, W], input_ids, attention_mask).
  """
  rng = np.random.default_rng(seed)
  p = tokens_per_image(model)
  b, n = len(images_per_row), max(max(images_per_row), 1)
  images = rng.normal(size=(b, n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  ids = rng.integers(1, IMAGE_TOKEN, size=(b, seq_len)).astype(np.int32)
  mask = np.ones((b, seq_len), bool)
  for row, (k, npad) in enumerate(zip(images_per_row, pad)):
    start = 2
    for _ in range(k):  # each image: its block of image tokens, then some text
      ids[row, start:start + p] = IMAGE_TOKEN
      start += p + 3
    assert start + npad <= seq_len, 'sequence too short for the images'
    if npad:
      ids[row, seq_len - npad:] = 0
      mask[row, seq_len - npad:] = False
  real = np.concatenate([images[r, :k] for r, k in enumerate(images_per_row)])
  torch_inputs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)))
  if len(real):
    torch_inputs['pixel_values'] = torch.from_numpy(real.transpose(0, 3, 1, 2).copy())
  lvm_images = images if sum(images_per_row) else None
  return dict(images=lvm_images, input_ids=ids, attention_mask=mask, torch=torch_inputs)


def torch_logits(model, inputs) -> np.ndarray:
  with torch.no_grad():
    return model(**inputs['torch']).logits.float().numpy()


def rel_err(a, b, mask=None) -> float:
  """max |a - b| / max |b| over the positions where mask is True."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if mask is not None:
    a, b = a[mask], b[mask]
  return float(np.abs(a - b).max() / np.abs(b).max())
