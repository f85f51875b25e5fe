"""LLaVA-OneVision-style: SigLIP-so400m/14-384 + Qwen2-7B(-Instruct), anyres_max_9 tiling.

  --config=configs/llava_onevision.py:stage=pretrain   projector alignment (`plain`)
  --config=configs/llava_onevision.py:stage=finetune   everything trains (`chatml`)
  --config=configs/llava_onevision.py:size=tiny        the same recipe, CPU-sized (tests)

Point `config.data.tokenizer` at the Qwen2 folder's tokenizer.json (no BOS; its chat template
is ChatML, checked on every sample) and `config.init` at the SigLIP and Qwen2 folders (stage 1)
or the stage-1 workdir. transformers' LlavaOnevisionForConditionalGeneration holds the same
model (`lvm.hf`; tests/test_family_configs.py compares the parameter counts).
Training it needs the anyres input pipeline (tiles per image in the batches), which main does
not have yet: on main the anyres model, its import and its export are there.

Values from LLaVA-NeXT's OneVision training scripts (scripts/train/*ov*.sh, as quoted by public
derivatives; the scripts themselves were not read here): learning rate 1e-5, vision tower 2e-6,
no weight decay, 3% warmup, cosine, `--mm_vision_select_layer -2` (SigLIP without its last
layer), anyres_max_9 over grids 1x1 .. 6x6 of tiles (384 px there, 378 here: see VISION),
`--model_max_length 32768`, `--version qwen_1_5` (ChatML). UNSURE: the global batch (the scripts give per-device 1 x
accumulation 2 x the GPU count; 128 below assumes 64 GPUs) and stage 1's batch and length.
"""

from lvm import config as base
from lvm.data import anyres as data_anyres

SIZES = {
    # Qwen/Qwen2-7B config.json: 28 layers, 28 heads, 4 KV heads, q/k/v biases (the qwen2
    # family's default), rope_theta 1e6, untied. Vocabulary padded to 152128 as llava-hf's
    # llava-onevision-qwen2-7b-ov-hf (image token 151646, an unused id of Qwen2's
    # tokenizer; lvm puts image/pad ids after the tokenizer's ids, 151646 + the padding).
    '7b': dict(vocab_size=152128, width=3584, depth=28, heads=28, kv_heads=4, mlp_dim=18944,
               rope_theta=1000000.0),
    'tiny': dict(vocab_size=512, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=128,
                 rope_theta=1000000.0),
}
# (image_token_id, pad_token_id): after the Qwen2 tokenizer's 151646 ids (151643 text ids
# and its 3 specials <|endoftext|>, <|im_start|>, <|im_end|>).
IDS = {'7b': (151646, 151647), 'tiny': (510, 511)}
VISION = {
    # google/siglip-so400m-patch14-384: 27 layers, 729 patches per tile. Its 384 px tiles
    # leave 6 px that the patch convolution drops; lvm's tower check wants image_size a
    # multiple of patch_size, so tiles here are 378 px: the same 27 x 27 grid and 729
    # position embeddings (the weights load), but images are resized to 378 px, not 384.
    '7b': dict(image_size=378, patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304,
               feature_layer=-2),
    'tiny': dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64,
                 feature_layer=-2),
}


def get_config(arg=None):
  arg = base.parse_arg(arg, stage='finetune', size='7b')
  if arg.size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, got {arg.size!r}')
  if arg.stage not in ('pretrain', 'finetune'):
    raise ValueError(f"stage must be 'pretrain' or 'finetune', got {arg.stage!r}")
  big = arg.size == '7b'
  config = base.get_config()
  config.model.vision = base.vision_config('siglip', **VISION[arg.size])
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config('qwen2', **SIZES[arg.size])
  config.model.image_token_id, config.model.pad_token_id = IDS[arg.size]
  tile = config.model.vision.image_size
  config.model.anyres.pinpoints = [list(p) for p in data_anyres.onevision_pinpoints(tile, 6)]
  config.model.anyres.vision_aspect_ratio = 'anyres_max_9'
  config.model.dtype = 'bfloat16' if big else 'float32'
  config.model.remat_policy = 'full' if big else 'none'

  config.data.dataset = 'llava_json'
  config.data.image_mean = base.SIGLIP_MEAN
  config.data.image_std = base.SIGLIP_STD
  config.data.seq_len = 32768 if big else 256
  config.train.num_epochs = 1.0
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.weight_decay = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = -1
  if arg.stage == 'pretrain':
    config.data.template = 'plain'  # Qwen2 has no BOS: plain starts with the image
    config.train.stage = 'pretrain'
    config.train.batch_size = 256  # UNSURE (see the docstring)
    config.optimizer.lr = 1e-3
    config.init.kind = 'hf_parts'  # SigLIP folder + Qwen2 folder, fresh projector
  else:
    config.data.template = 'chatml'
    config.train.stage = 'full'  # the tower trains too, at its own rate
    config.train.batch_size = 128  # UNSURE (see the docstring)
    config.optimizer.lr = 1e-5
    config.optimizer.module_lr = {'^vision/': 2e-6}
    config.init.kind = 'checkpoint'  # the stage-1 run's workdir
  if not big:
    config.train.batch_size = 8
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
