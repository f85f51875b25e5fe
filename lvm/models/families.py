"""The decoder families: each is the one `Decoder` with the fields its config sets.

| family  | what differs from LLaMA (its registered defaults)                               |
|---------|---------------------------------------------------------------------------------|
| llama   | nothing (also Vicuna, Llama 2 / 3.x)                                             |
| qwen2   | biases on q/k/v (`attention_bias`)                                              |
| qwen3   | RMSNorm of each head's query and key (`qk_norm`)                                |
| mistral | sliding-window attention (`sliding_window` 4096, every layer)                   |
| gemma   | GeGLU, (1 + w) RMSNorm, embeddings x sqrt(width), head_dim 256, tied embeddings |
| gemma2  | Gemma's plus soft-capped attention and final logits, alternating local / global |
|         | layers, norms after attention and MLP, `query_scale` (query_pre_attn_scalar)    |

All register `build` and `check` with `lvm.registry.DECODER`; `lvm.config.decoder_config`
takes a family's defaults over the schema's (the LLaMA values, stated there once).
"""

from lvm import kernels
from lvm import registry
from lvm.models import checks
from lvm.models import layers
from lvm.models import rope
from lvm.models.decoder import Decoder

_GEMMA = dict(norm_offset=1.0, mlp_act='gelu_tanh', embed_scale=True, tie_embeddings=True,
              head_dim=256, norm_eps=1e-6)

# family -> the `config.model.decoder` fields it sets otherwise than LLaMA (transformers'
# config defaults for the family where they differ).
DEFAULTS = {
    'llama': {},
    'qwen2': dict(attention_bias=True, norm_eps=1e-6, rope_theta=10000.0),
    'qwen3': dict(qk_norm=True, norm_eps=1e-6),
    'mistral': dict(sliding_window=4096),
    'gemma': _GEMMA,
    'gemma2': dict(_GEMMA, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                   global_every=2, post_norms=True, query_scale=256.0),
}


def build(model_config, impls: kernels.Impls) -> Decoder:
  """The decoder of `model_config` (the full `config.model`), with the resolved kernels."""
  d = model_config.decoder
  scaling = d.rope_scaling
  scaling = tuple(sorted(dict(scaling).items())) if scaling else None
  return Decoder(
      vocab_size=d.vocab_size, width=d.width, depth=d.depth, heads=d.heads,
      kv_heads=d.kv_heads, mlp_dim=d.mlp_dim, head_dim=d.head_dim, rope_theta=d.rope_theta,
      rope_scaling=scaling, norm_eps=d.norm_eps, tie_embeddings=d.tie_embeddings,
      dtype=layers.dtype(model_config.dtype), param_dtype=layers.dtype(model_config.param_dtype),
      scan_layers=model_config.scan_layers, remat_policy=model_config.remat_policy,
      attention_impl=impls.attention, matmul_impl=impls.matmul,
      precast_weights=model_config.precast_weights,
      fuse_projections=model_config.fuse_projections, qk_norm=d.qk_norm,
      attention_bias=d.attention_bias, norm_offset=d.norm_offset, mlp_act=d.mlp_act,
      embed_scale=d.embed_scale, query_scale=d.query_scale, attn_softcap=d.attn_softcap,
      final_softcap=d.final_softcap, sliding_window=d.sliding_window,
      global_every=d.global_every, post_norms=d.post_norms)


def check(config, problems: registry.Problems):
  """`model.decoder`'s own faults: sizes, grouped-query heads, the head width, RoPE scaling,
  the family switches, and the image and padding token ids against the vocabulary."""
  d = config.model.decoder
  checks.positive_ints(problems, d, 'model.decoder',
                       ('vocab_size', 'width', 'depth', 'heads', 'kv_heads', 'mlp_dim'))
  if checks.all_positive(d, ('heads', 'kv_heads')) and d.heads % d.kv_heads:
    problems.add('model.decoder.kv_heads', f'heads {d.heads} is not a multiple of kv_heads '
                 f'{d.kv_heads} (grouped-query attention)',
                 'pick kv_heads dividing model.decoder.heads')
  if checks.all_positive(d, ('width', 'heads')) and not d.get('head_dim') and d.width % d.heads:
    problems.add('model.decoder.heads', f'width {d.width} is not divisible by heads {d.heads} '
                 'and head_dim is 0 (derived)', 'pick heads dividing the width, or set '
                 'model.decoder.head_dim')
  for problem in rope.check_scaling(d.get('rope_scaling')):
    problems.add('model.decoder.rope_scaling', problem,
                 'use None or one of those types with its keys (lvm/models/rope.py)')
  if d.get('mlp_act') not in layers.ACTIVATIONS:
    problems.add('model.decoder.mlp_act', f'{d.get("mlp_act")!r} is not an activation',
                 f'use one of {sorted(layers.ACTIVATIONS)}')
  for key in ('sliding_window', 'global_every'):
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      problems.add(f'model.decoder.{key}', f'must be an integer >= 0, got {value!r}',
                   'set 0 (off) or a positive integer')
  for key in ('attn_softcap', 'final_softcap', 'query_scale', 'norm_offset'):
    value = d.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      problems.add(f'model.decoder.{key}', f'must be a number >= 0, got {value!r}',
                   'set 0 (off) or a positive number')
  vocab = d.get('vocab_size')
  if isinstance(vocab, int):
    ids = {key: config.model.get(key) for key in ('image_token_id', 'pad_token_id')}
    for key, tid in ids.items():
      if not isinstance(tid, int) or not 0 <= tid < vocab:
        problems.add(f'model.{key}', f'{tid!r} is outside the vocabulary [0, {vocab})',
                     f'use an id below model.decoder.vocab_size={vocab}, or grow the vocabulary')
    if ids['image_token_id'] == ids['pad_token_id']:
      problems.add('model.pad_token_id', 'equals model.image_token_id', 'give padding its own id')


for _name, _defaults in DEFAULTS.items():
  registry.DECODER.register(_name, build, defaults=lambda d=_defaults: dict(d), check=check)
