"""A test sweep over the tiny config: two projectors, a failing arm, two seeds."""

from experiments import sweep


def get_sweep():
  return sweep.Sweep(
      name='fixture',
      config='configs/tiny.py',
      description='test sweep',
      overrides={'train.num_steps': 4},
      variants=[
          sweep.Variant('linear', {'model.projector.kind': 'linear'}),
          sweep.Variant('mlp2x_gelu', {}),
          sweep.Variant('bad_lr', {'optimizer.lr': 10.0}, seeds=(0,)),
      ],
      seeds=(0, 1))
