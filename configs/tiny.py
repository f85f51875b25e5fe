"""A tiny LLaVA for tests: seconds to compile and run on one CPU core.

`configs/tiny.py:seq_len=64,kv_heads=2,scan=0`
"""

from lvm import config as base


def get_config(arg=None):
  arg = base.parse_arg(arg, seq_len=64, kv_heads=2, scan=True, batch_size=8, dataset='shapes')
  config = base.get_config()

  config.model.vision = base.vision_config(
      'clip', image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config(
      vocab_size=512, width=64, depth=2, heads=4, kv_heads=arg.kv_heads, mlp_dim=128)
  config.model.image_token_id = 510
  config.model.pad_token_id = 511
  config.model.dtype = 'float32'
  config.model.scan_layers = arg.scan

  config.data.dataset = arg.dataset
  config.data.template = 'vicuna_v1'
  config.data.seq_len = arg.seq_len
  config.data.image_aspect = 'pad'

  config.train.batch_size = arg.batch_size
  config.train.num_steps = 5
  config.train.log_every = 1
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 1
  config.optimizer.warmup_ratio = 0.0
  config.mesh.data = -1
  config.checkpoint.interval = 2
  config.checkpoint.async_save = False
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
