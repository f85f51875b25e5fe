"""LLaVA with Llama-3-8B(-Instruct): LLaVA-1.5's recipe (CLIP ViT-L/14-336, 2-layer MLP, padded
square images) on a Llama-3 decoder, rendered with its own chat format.

  --config=configs/llama3.py:stage=pretrain    projector alignment (`plain`, LCS-558K)
  --config=configs/llama3.py:stage=finetune    instruction tuning (`llama3`, mix665k)
  --config=configs/llama3.py:size=tiny         the same recipe, CPU-sized (tests)

Point `config.data.tokenizer` at the Llama-3 folder's tokenizer.json: its tokenizer_config.json
carries the chat template every stage-2 sample is checked against (`lvm.data.chat_template`),
and `lvm.validate` refuses a tokenizer that does not fit the template before compiling.
"""

from lvm import config as base

SIZES = {
    # meta-llama/Meta-Llama-3-8B config.json: GQA with 8 KV heads, rope_theta 500000, untied.
    # The vocabulary is the tokenizer's 128256 ids padded to 128320 (as llava-hf's
    # llama3-llava-next-8b-hf does) so that the image and pad ids sit after it.
    '8b': dict(vocab_size=128320, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336,
               rope_theta=500000.0, norm_eps=1e-5),
    'tiny': dict(vocab_size=512, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=128,
                 rope_theta=500000.0, norm_eps=1e-5),
}
IDS = {'8b': (128256, 128257), 'tiny': (510, 511)}  # (image_token_id, pad_token_id)
TINY_VISION = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)


def get_config(arg=None):
  arg = base.parse_arg(arg, stage='finetune', size='8b')
  if arg.size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, got {arg.size!r}')
  if arg.stage not in ('pretrain', 'finetune'):
    raise ValueError(f"stage must be 'pretrain' or 'finetune', got {arg.stage!r}")
  config = base.get_config()
  config.model.vision = (base.vision_config('clip') if arg.size == '8b'  # ViT-L/14-336, -2
                         else base.vision_config('clip', **TINY_VISION))
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config('llama', **SIZES[arg.size])
  config.model.image_token_id, config.model.pad_token_id = IDS[arg.size]
  config.model.dtype = 'bfloat16' if arg.size == '8b' else 'float32'
  config.model.remat_policy = 'full' if arg.size == '8b' else 'none'

  config.data.dataset = 'llava_json'
  config.data.seq_len = 2048 if arg.size == '8b' else 128
  config.data.image_aspect = 'pad'
  config.train.stage = arg.stage
  config.train.num_epochs = 1.0
  # LLaVA-1.5's schedule (configs/llava15.py). Not checked against a published Llama-3 LLaVA
  # run: LLaVA-NeXT's llama3 recipe is anyres (configs/llava_onevision.py is the anyres one).
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.weight_decay = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = -1
  if arg.stage == 'pretrain':
    config.data.template = 'plain'
    config.train.batch_size = 256
    config.optimizer.lr = 1e-3
    config.init.kind = 'hf_parts'  # CLIP folder + Llama-3 folder, fresh projector
  else:
    # Llama-3's chat format (its tokenizer's chat template) with LLaVA-NeXT's
    # conv_llava_llama_3 system prompt.
    config.data.template = 'llama3'
    config.train.batch_size = 128
    config.optimizer.lr = 2e-5
    config.init.kind = 'checkpoint'  # the stage-1 run's workdir
  if arg.size == 'tiny':
    config.train.batch_size = 8
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
