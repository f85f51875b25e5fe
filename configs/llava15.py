"""LLaVA-1.5 (7B / 13B), both stages, with the public hyperparameters.

  --config=configs/llava15.py:size=7b,stage=pretrain     projector alignment (LCS-558K)
  --config=configs/llava15.py:size=13b,stage=finetune    instruction tuning (mix665k)
  --config=configs/llava15.py:size=tiny,stage=pretrain   the same recipe on a model that runs
                                                         in seconds on a CPU (tests)
  --config=configs/llava15.py:...,packing=1              several samples per row instead
                                                         (lvm.data.packing; not LLaVA's batches)
  --config=configs/llava15.py:size=7b,lora=1             stage 2 with LLaVA's LoRA recipe
                                                         (finetune_lora.sh): r 128, alpha 256,
                                                         dropout 0.05, lr 2e-4 on the adapters,
                                                         the projector trained in full at 2e-5

As scripts/v1_5/pretrain.sh and finetune.sh run it (side by side in docs/training.md): stage 1
sets no image_aspect_ratio, so its images go through the CLIP processor's resize + center crop
(`resize`); stage 2 pads them to square (`pad`) and groups by modality length.

Point `config.data.manual_dir` at the LLaVA-format data, `config.data.tokenizer` at the
decoder's tokenizer, and `config.init` at transformers checkpoints (see README).
"""

from lvm import config as base

SIZES = {
    # Vicuna v1.5 = LLaMA-2 shapes.
    '7b': dict(width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008),
    '13b': dict(width=5120, depth=40, heads=40, kv_heads=40, mlp_dim=13824),
    # A CPU-sized stand-in (tests/reliability/test_readme_llava15.py): a 256-token LLaMA
    # vocabulary, llava-hf style image/pad ids after it.
    'tiny': dict(width=64, depth=2, heads=4, kv_heads=4, mlp_dim=128, vocab_size=320),
}
# The tiny size's CLIP tower, image/pad ids, and batch and sequence length.
TINY_VISION = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)
TINY_RUN = dict(image_token_id=256, pad_token_id=257, batch_size=8, seq_len=128)


def get_config(arg=None):
  arg = base.parse_arg(arg, size='7b', stage='finetune', packing=False, lora=False)
  if arg.size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, got {arg.size!r}')
  if arg.stage not in ('pretrain', 'finetune'):
    raise ValueError(f"stage must be 'pretrain' or 'finetune', got {arg.stage!r}")
  config = base.get_config()
  config.model.vision = base.vision_config('clip')  # CLIP ViT-L/14-336, hidden state -2
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config(**SIZES[arg.size])
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'full'

  config.data.dataset = 'llava_json'
  config.data.seq_len = 2048  # --model_max_length 2048
  config.train.stage = arg.stage
  config.train.num_epochs = 1.0
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.weight_decay = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = -1

  if arg.stage == 'pretrain':
    config.data.template = 'plain'  # --version plain
    # No --image_aspect_ratio: LLaVA's default 'square' hands the image to the CLIP
    # processor as it is (shortest side to 336, center crop).
    config.data.image_aspect = 'resize'
    config.train.batch_size = 256
    config.optimizer.lr = 1e-3
    config.init.kind = 'hf_parts'  # CLIP folder + Vicuna folder, fresh projector
  else:
    config.data.template = 'vicuna_v1'  # --version v1
    config.data.image_aspect = 'pad'  # --image_aspect_ratio pad
    # --group_by_modality_length True; packing replaces it (lvm.data.length_groups).
    config.data.group_by_modality_length = not arg.packing
    config.train.batch_size = 128
    config.optimizer.lr = 2e-5
    config.init.kind = 'checkpoint'  # the stage-1 run's workdir
  if arg.packing:
    config.data.packing = True
  if arg.lora:
    if arg.stage != 'finetune':
      raise ValueError('lora=1 is the stage-2 (finetune) recipe; stage 1 trains the projector '
                       'alone, in full')
    # LLaVA's scripts/v1_5/finetune_lora.sh: every decoder Linear but the LM head (its
    # find_all_linear_names skips the tower, the projector and lm_head), the projector in full.
    config.lora.enable = True
    config.lora.rank = 128
    config.lora.alpha = 256.0
    config.lora.dropout = 0.05
    config.lora.train_full = '^projector/'
    config.optimizer.lr = 2e-4
    config.optimizer.module_lr = {'^projector/': 2e-5}  # --mm_projector_lr 2e-5
  if arg.size == 'tiny':  # float32: bfloat16 matmuls are slow on a CPU
    config.model.vision = base.vision_config('clip', **TINY_VISION)
    config.model.image_token_id = TINY_RUN['image_token_id']
    config.model.pad_token_id = TINY_RUN['pad_token_id']
    config.model.dtype = 'float32'
    config.model.remat_policy = 'none'
    config.data.seq_len = TINY_RUN['seq_len']
    config.train.batch_size = TINY_RUN['batch_size']
    if arg.lora:  # rank 128 exceeds the tiny decoder's width: same alpha / r
      config.lora.rank, config.lora.alpha = 8, 16.0
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
