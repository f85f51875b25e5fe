"""LLaVA-NeXT (llava-v1.6-vicuna-7b) training recipe: anyres tiling, tower unfrozen in stage 2.

  --config=configs/llava_next.py:stage=pretrain   projector alignment (BLIP/LCS-558K, plain)
  --config=configs/llava_next.py:stage=finetune   instruction tuning, anyres, all parts train
  --config=configs/llava_next.py:size=tiny,stage=finetune   the same recipe at CPU size

Values from the public LLaVA-NeXT training scripts (github.com/LLaVA-VL/LLaVA-NeXT,
scripts/train/pretrain_clip.sh and finetune_clip.sh, "the first image version LLaVA-NeXT
(2024-01) training script") and the llava-v1.6 release notes; those scripts are written for a
Qwen2-7B decoder, this config for Vicuna-7B v1.5 as llava-v1.6-vicuna-7b. UNSURE marks a value
the public material does not pin down for the Vicuna 7B model (see the notes beside each).

- Tower: CLIP ViT-L/14-336, hidden state -2, patch tokens (`--mm_vision_select_layer -2`);
  projector `mlp2x_gelu`.
- Stage 1 (`pretrain_clip.sh`): `plain` template, projector only (`--mm_tunable_parts=
  mm_mlp_adapter`), lr 1e-3, cosine, warmup 3%, no weight decay, 1 epoch. The script sets no
  `--image_aspect_ratio` (LLaVA-NeXT's default 'square': CLIP resize + center crop, 576 tokens,
  no tiling), so stage 1 here is a fixed-size model (`model.anyres.pinpoints` empty,
  `data.image_aspect='resize'`). Stage 2's `image_newline` is then new: `init.kind=
  'checkpoint'` keeps the leaves the stage-1 checkpoint lacks at their random init
  (transformers' init: randn / sqrt(D), as LLaVA-NeXT's `image_newline`).
- Stage 2 (`finetune_clip.sh`): `--image_aspect_ratio anyres`, `--image_grid_pinpoints
  [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]`, `--mm_patch_merge_type
  spatial_unpad` (unpadded features with an image newline per row: `vision_aspect_ratio=
  'anyres'`), tower + projector + decoder trainable (`--mm_tunable_parts=mm_vision_tower,
  mm_mlp_adapter,mm_language_model`), tower lr 2e-6 (`--mm_vision_tower_lr=2e-6`), cosine,
  warmup 3%, no weight decay, 1 epoch, `group_by_modality_length`.
"""

from lvm import config as base
from lvm.data import anyres

SIZES = {
    '7b': dict(width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008),  # Vicuna-7B v1.5
    # A CPU-sized stand-in with the same recipe: 32 px tiles, the pinpoints scaled from 336 px.
    'tiny': dict(width=64, depth=2, heads=4, kv_heads=4, mlp_dim=128, vocab_size=320),
}
TINY_VISION = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)


def get_config(arg=None):
  arg = base.parse_arg(arg, size='7b', stage='finetune')
  if arg.size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, got {arg.size!r}')
  if arg.stage not in ('pretrain', 'finetune'):
    raise ValueError(f"stage must be 'pretrain' or 'finetune', got {arg.stage!r}")
  config = base.get_config()
  config.model.vision = base.vision_config('clip')  # CLIP ViT-L/14-336, hidden state -2
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config(**SIZES[arg.size])
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'full'  # `--gradient_checkpointing True`

  config.data.dataset = 'llava_json'
  config.train.num_epochs = 1.0
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.weight_decay = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = -1  # the scripts run DeepSpeed ZeRO-3: parameters sharded

  if arg.stage == 'pretrain':
    config.data.template = 'plain'
    config.data.image_aspect = 'resize'  # LLaVA-NeXT's default 'square' (see the docstring)
    config.data.seq_len = 2048  # UNSURE: the script says 8192; captions need far fewer
    config.train.stage = 'pretrain'  # projector only
    # UNSURE: the script gives 16 per device and no GPU count; 256 is LLaVA-1.5's stage 1
    # (not confirmed for llava-v1.6).
    config.train.batch_size = 256
    config.optimizer.lr = 1e-3
    config.init.kind = 'hf_parts'  # CLIP folder + Vicuna folder, fresh projector
  else:
    config.model.anyres.pinpoints = [list(p) for p in anyres.LLAVA_NEXT_PINPOINTS]
    config.model.anyres.vision_aspect_ratio = 'anyres'
    config.data.template = 'vicuna_v1'
    # Up to 5 tiles of 576 features: a 2x2 image takes 576 + 48 * (48 + 1) = 2928 tokens.
    # UNSURE: the script says 32768 (Qwen2); Vicuna's context is 4096.
    config.data.seq_len = 4096
    config.train.stage = 'full'  # tower, projector and decoder all train
    # UNSURE: LLaVA-1.5's stage-2 batch (the script: 4 per device, GPU count not stated;
    # not confirmed for llava-v1.6).
    config.train.batch_size = 128
    # UNSURE: 2e-5 as LLaVA-1.5 stage 2 (recalled from the llava-v1.6 release notes for the
    # 7B/13B models, not re-checked); the public Qwen2-7B script uses 1e-5.
    config.optimizer.lr = 2e-5
    config.optimizer.module_lr = {'^vision/': 2e-6}  # `--mm_vision_tower_lr=2e-6`
    config.init.kind = 'checkpoint'  # the stage-1 run's workdir
  if arg.size == 'tiny':  # float32: bfloat16 matmuls are slow on a CPU
    config.model.vision = base.vision_config('clip', **TINY_VISION)
    config.model.image_token_id = 256
    config.model.pad_token_id = 257
    config.model.dtype = 'float32'
    config.model.remat_policy = 'none'
    if arg.stage == 'finetune':
      scale = TINY_VISION['image_size'] / 336
      config.model.anyres.pinpoints = [[round(h * scale), round(w * scale)]
                                       for h, w in anyres.LLAVA_NEXT_PINPOINTS]
    config.data.seq_len = 256
    config.train.batch_size = 8
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
