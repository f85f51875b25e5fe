"""Projector ablation on the `shapes` demo: linear vs mlp2x_gelu vs downsample_mlp.

LLaVA-1.5 replaced LLaVA's linear projector with a 2-layer GELU MLP; `downsample_mlp`
folds 2x2 patches into one token first (4x fewer visual tokens, a shorter sequence).
Whole sweep (3 variants x 2 seeds at a reduced step count) on a 2-core CPU: see
docs/experiments.md for the measured time and the table.

  python -m experiments.run shapes_projector --workdir=workdirs/shapes_projector
  python -m experiments.compare workdirs/shapes_projector
"""

from experiments import sweep

# A reduced run (the demo trains 600 steps of 32): the whole sweep fits in ~30 minutes on a
# shared 2-core CPU.
STEPS = 100
SHARED = {
    'train.num_steps': STEPS,
    'train.batch_size': 16,
    'train.log_every': 5,
    'train.eval_every': STEPS // 4,
    'train.eval_batches': 16,  # 256 held-out examples per evaluation
    # linear and mlp2x_gelu keep all 64 patch tokens (downsample_mlp: 16): the longest
    # sample is then 133 tokens, so every arm gets a length that fits it (same data).
    'data.seq_len': 144,
}


def get_sweep():
  return sweep.Sweep(
      name='shapes_projector',
      config='configs/shapes.py',
      description='Projector ablation on the shapes demo: linear vs mlp2x_gelu vs '
                  'downsample_mlp (2x2 patch merge, 4x fewer visual tokens).',
      overrides=SHARED,
      variants=[
          sweep.Variant('linear', {'model.projector.kind': 'linear'}),
          sweep.Variant('mlp2x_gelu', {'model.projector.kind': 'mlp2x_gelu'}),
          sweep.Variant('downsample_mlp', {'model.projector.kind': 'downsample_mlp'}),
      ],
      seeds=(0, 1),
      # A seed sets the initialization and the data order.
      seed_key=('train.seed', 'data.shuffle_seed'))
