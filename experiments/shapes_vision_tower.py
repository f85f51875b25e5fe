"""Vision-tower ablation on the `shapes` demo: frozen vs trainable tower, feature layer.

The demo trains from random weights, so a frozen tower is a fixed random feature
extractor: this sweep asks how much the answers depend on learning the tower, and whether
LLaVA's choice of the second-to-last layer (-2) beats the last one (-1, the demo's
setting) with this 2-layer tower.

  python -m experiments.run shapes_vision_tower --workdir=workdirs/shapes_vision_tower
  python -m experiments.compare workdirs/shapes_vision_tower
"""

from experiments import sweep

STEPS = 100
SHARED = {
    'train.num_steps': STEPS,
    'train.batch_size': 16,
    'train.log_every': 5,
    'train.eval_every': STEPS // 4,
    'train.eval_batches': 16,  # 256 held-out examples per evaluation
}


def get_sweep():
  return sweep.Sweep(
      name='shapes_vision_tower',
      config='configs/shapes.py',
      description='Vision tower on the shapes demo: trained vs frozen (random) tower, and '
                  'features from the last layer (-1, the demo) vs the one before (-2, LLaVA).',
      overrides=SHARED,
      variants=[
          # The demo's own setting: everything trains, features from the last layer.
          sweep.Variant('trainable_l-1', {'train.stage': 'full',
                                          'model.vision.feature_layer': -1}),
          sweep.Variant('trainable_l-2', {'train.stage': 'full',
                                          'model.vision.feature_layer': -2}),
          # 'finetune' trains projector + decoder: the (random) tower stays as initialized.
          sweep.Variant('frozen_l-1', {'train.stage': 'finetune',
                                       'model.vision.feature_layer': -1}),
      ],
      seeds=(0, 1),
      # A seed sets the initialization and the data order.
      seed_key=('train.seed', 'data.shuffle_seed'))
