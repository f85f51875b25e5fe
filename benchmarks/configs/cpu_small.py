"""The small LLaVA used for the CPU side-by-side with transformers (about 8.6M parameters).

`python -m lvm.bench --config=benchmarks/configs/cpu_small.py --mode=train`

CLIP-style tower on 64 px images (8 px patches: 64 visual tokens after dropping CLS),
mlp2x_gelu projector, a 4-layer LLaMA decoder; batch 8, length 128 (64 image tokens
and 64 text tokens per row, 63 of them supervised targets). Every parameter is trained
(stage 'full') so that the transformers step it is compared with computes the same loss
and gradients. lvm runs the LM head only at the 63 scored positions of a row
(`train.max_scored_tokens`; `cpu_small.py:scored=0` runs it at all 128, as transformers
does); the FLOP count follows. `cpu_small.py:dtype=bfloat16` computes in bfloat16 with
float32 weights and AdamW state (mixed precision; the side-by-side then runs transformers
under CPU autocast).
"""

from lvm import config as base


def get_config(arg=None):
  arg = base.parse_arg(arg, batch_size=8, seq_len=128, scan=False, dtype='float32',
                       scored=63, fuse=False)
  config = base.get_config()
  config.model.vision = base.vision_config(
      'clip', image_size=64, patch_size=8, width=128, depth=2, heads=4, mlp_dim=512,
      feature_layer=-1)
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config(
      vocab_size=8192, width=256, depth=4, heads=8, kv_heads=8, mlp_dim=928)
  config.model.image_token_id = 8190
  config.model.pad_token_id = 8191
  config.model.dtype = arg.dtype
  config.model.param_dtype = 'float32'
  config.model.scan_layers = arg.scan
  config.model.remat_policy = 'none'
  config.data.dataset = 'shapes'
  config.data.seq_len = arg.seq_len
  config.train.stage = 'full'
  config.train.batch_size = arg.batch_size
  config.train.max_scored_tokens = arg.scored
  config.model.fuse_projections = arg.fuse
  config.optimizer.lr = 1e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.clip_norm = 0.0
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_ratio = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
