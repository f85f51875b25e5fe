"""LLaVA-1.5-shaped benchmark configs for one GPU (H100/H200) or a TPU host.

  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m lvm.bench \\
      --config=benchmarks/configs/gpu_llava15.py:size=2b,scan=0,remat=dots_flash_activations,fuse=1,batch_size=10 \\
      --mode=train --gpu_flags --measure_peak
  python -m lvm.bench --config=benchmarks/configs/gpu_llava15.py:size=7b,batch_size=1,seq_len=640 \\
      --mode=prefill --measure_peak
  python -m lvm.bench --config=benchmarks/configs/gpu_llava15.py:size=7b,batch_size=1,seq_len=640 \\
      --mode=decode --decode_len=128 --steps=64

CLIP ViT-L/14-336 (frozen, as in LLaVA-1.5 stage 2) + mlp2x_gelu + a LLaMA decoder
trained in full (`stage=finetune`), bf16 compute with float32 parameters and AdamW
state, scanned layers, a remat policy and cuDNN flash attention
(`jax.nn.dot_product_attention(implementation='cudnn')`). Sizes: 1b, 2b and 3b fit a
full fine-tune on one 80 GB H100 (float32 weights + grads + 2 Adam moments = 16 bytes
per trained parameter, plus activations). The fastest training setting found on an H100
unrolls the layers (`scan=0`), keeps every activation (`remat=dots_flash_activations`),
runs q/k/v and gate/up as one GEMM each (`fuse=1`), turns Triton GEMMs off and takes batch
10, the most that fits so; docs/performance.md has the measurements. 7b is for
inference timing (prefill = time to first token for an image + 64-token prompt:
576 + 64 = 640 tokens). `anyres=1` makes it LLaVA-NeXT-shaped (llava-v1.6's pinpoints: up to
5 tiles, 2928 visual tokens for a 2 x 2 grid; give seq_len=4096, and stage=full to train the
tower as LLaVA-NeXT's stage 2 does).
"""

from lvm import config as base
from lvm.data import anyres

SIZES = {
    '1b': dict(width=2048, depth=16, heads=16, kv_heads=16, mlp_dim=5632),
    '2b': dict(width=2560, depth=24, heads=20, kv_heads=20, mlp_dim=6912),
    # OpenLLaMA-3B's widths with 25 heads of 128: its 32 heads of 100 are not a head size
    # cuDNN's flash attention takes (a multiple of 8, at most 256).
    '3b': dict(width=3200, depth=26, heads=25, kv_heads=25, mlp_dim=8640),
    '7b': dict(width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008),  # LLaMA-2 7B
}


def get_config(arg=None):
  arg = base.parse_arg(arg, size='2b', batch_size=8, seq_len=2048, remat='dots_no_batch',
                       attention='cudnn', scan=True, dtype='bfloat16', fuse=False,
                       anyres=False, stage='finetune')
  if arg.size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, got {arg.size!r}')
  config = base.get_config()
  config.model.vision = base.vision_config('clip')
  config.model.projector = base.projector_config('mlp2x_gelu')
  config.model.decoder = base.decoder_config(**SIZES[arg.size])
  config.model.dtype = arg.dtype
  config.model.param_dtype = 'float32'
  config.model.scan_layers = arg.scan
  config.model.remat_policy = arg.remat
  config.model.attention_impl = arg.attention
  config.model.fuse_projections = arg.fuse
  if arg.anyres:  # LLaVA-NeXT: llava-v1.6's grids of 336 px tiles, unpadded, image newlines
    config.model.anyres.pinpoints = [list(p) for p in anyres.LLAVA_NEXT_PINPOINTS]
    config.model.anyres.vision_aspect_ratio = 'anyres'
  config.data.dataset = 'llava_json'
  config.data.seq_len = arg.seq_len
  config.train.stage = arg.stage
  config.train.batch_size = arg.batch_size
  config.optimizer.lr = 2e-5
  config.optimizer.clip_norm = 1.0
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.lock()  # Groups replaced above come unlocked: a mistyped key must fail.
  return config
