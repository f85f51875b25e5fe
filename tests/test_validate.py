"""lvm.validate: every config error is caught before compiling, naming the key and the fix."""

import importlib
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import llava15, tiny
from lvm import models, validate


def _tiny(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('__')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _errors(config, num_devices=8, num_processes=1) -> str:
  start = time.perf_counter()
  with pytest.raises(ValueError) as info:
    validate.validate_config(config, num_devices, num_processes)
  # The issue asks for an answer in seconds, before any compile.
  assert time.perf_counter() - start < 3.0
  return str(info.value)


def test_shipped_configs_are_valid():
  validate.validate_config(tiny.get_config(), 8)
  validate.validate_config(tiny.get_config(), 1)
  validate.validate_config(tiny.get_config('kv_heads=4,scan=0'), 8)
  for arg in ('size=7b,stage=pretrain', 'size=13b,stage=finetune'):
    config = llava15.get_config(arg)
    # LLaVA-1.5 needs the user's folders; with them set the config must be valid.
    config.data.manual_dir = '/data/llava'
    config.init.path = config.init.vision_path = config.init.decoder_path = '/ckpt'
    validate.validate_config(config, 64)


@pytest.mark.parametrize('name', sorted(
    f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), '..', 'configs'))
    if f.endswith('.py') and f != '__init__.py'))
def test_every_config_file_validates(name):
  """Every config in configs/ with its default args (user folders filled in) is valid."""
  config = importlib.import_module(f'configs.{name}').get_config()
  if config.data.dataset == 'llava_json':
    config.data.manual_dir = '/data/llava'
  config.init.path = config.init.vision_path = config.init.decoder_path = '/ckpt'
  batch = config.train.batch_size
  validate.validate_config(config, 8 if batch % 8 == 0 else 1)


def test_shipped_llava15_names_missing_paths():
  msg = _errors(llava15.get_config('size=7b,stage=pretrain'), 8)
  assert 'config.data.manual_dir' in msg
  assert 'config.init.vision_path' in msg and 'config.init.decoder_path' in msg


def test_mesh_product_must_equal_device_count():
  msg = _errors(_tiny(mesh__data=2, mesh__fsdp=2, mesh__tensor=1), num_devices=8)
  assert 'config.mesh' in msg and 'equal 8' in msg and '-1' in msg
  msg = _errors(_tiny(mesh__data=-1, mesh__fsdp=3), num_devices=8)
  assert 'config.mesh' in msg and 'not divisible by 3' in msg


def test_batch_must_divide_over_batch_axes():
  msg = _errors(_tiny(train__batch_size=12, mesh__data=4, mesh__fsdp=2), num_devices=8)
  assert 'config.train.batch_size: 12 is not divisible by mesh.data*mesh.fsdp = 8' in msg
  assert 'multiple of 8' in msg
  # With gradient accumulation the micro-batch is what is sharded.
  msg = _errors(_tiny(train__batch_size=16, train__grad_accum_steps=4), num_devices=8)
  assert 'batch_size/grad_accum_steps = 4' in msg and 'multiple of 32' in msg
  msg = _errors(_tiny(train__batch_size=10, train__grad_accum_steps=4), num_devices=1)
  assert 'not divisible by train.grad_accum_steps=4' in msg


def test_batch_must_divide_over_processes():
  config = _tiny(train__batch_size=6, mesh__data=1, mesh__tensor=-1)
  validate.validate_config(config, 2, num_processes=2)
  msg = _errors(config, num_devices=4, num_processes=4)
  assert 'config.train.batch_size: 6 is not divisible by the 4 processes' in msg


def test_seq_len_shorter_than_image_tokens():
  per_image = models.num_image_tokens(tiny.get_config())
  assert per_image == 16  # 32 px / patch 8 = 4x4 patches, CLS dropped
  msg = _errors(_tiny(data__seq_len=per_image))
  assert 'config.data.seq_len: 16 leaves no room for text: one image alone takes 16 tokens' in msg
  assert 'above 16' in msg
  validate.validate_config(_tiny(data__seq_len=per_image + 8), 8)


@pytest.mark.parametrize('overrides, key, value, split', [
    (dict(mesh__data=1, mesh__tensor=8), 'model.decoder.heads', 4, 8),
    (dict(mesh__data=2, mesh__tensor=4), 'model.decoder.kv_heads', 2, 4),
    (dict(mesh__data=4, mesh__tensor=2, model__decoder__vocab_size=513), 'model.decoder.vocab_size',
     513, 2),
    (dict(mesh__data=4, mesh__tensor=2, model__decoder__mlp_dim=127), 'model.decoder.mlp_dim',
     127, 2),
    (dict(mesh__data=1, mesh__fsdp=8, model__vision__width=36, model__vision__heads=4),
     'model.vision.width', 36, 8),
])
def test_sharded_dims_must_divide(overrides, key, value, split):
  msg = _errors(_tiny(**overrides))
  assert f'config.{key}: {value} is not divisible by' in msg and f'= {split}' in msg
  assert f'choose {key} as a multiple of {split}' in msg


@pytest.mark.parametrize('key, value, expect', [
    ('model__vision__kind', 'vit', "config.model.vision.kind: 'vit' is not a registered vision"),
    ('model__projector__kind', 'mlp2x_relu6', 'config.model.projector.kind'),
    ('model__projector__kind', 'conv', "config.model.projector.kind: 'conv' is not a registered"),
    ('model__dtype', 'bf16', "config.model.dtype: unknown value 'bf16'"),
    ('model__param_dtype', 'fp32', "config.model.param_dtype: unknown value 'fp32'"),
    ('data__template', 'vicuna', "config.data.template: 'vicuna' is not a registered template"),
    ('data__dataset', 'coco', "config.data.dataset: 'coco' is not a registered dataset"),
    ('train__stage', 'align', "config.train.stage: unknown value 'align'"),
    ('optimizer__schedule', 'step', "config.optimizer.schedule: unknown value 'step'"),
    ('model__remat_policy', 'some', "config.model.remat_policy: unknown value 'some'"),
    ('model__vision__feature_layer', -4, 'config.model.vision.feature_layer: -4 is out of range'),
    ('model__vision__image_size', 30, 'config.model.vision.image_size: 30 is not a multiple'),
    ('model__image_token_id', 600, 'config.model.image_token_id: 600 is outside the vocabulary'),
    ('model__decoder__kv_heads', 3, 'config.model.decoder.kv_heads: heads 4 is not a multiple'),
    ('train__batch_size', 0, 'config.train.batch_size: must be a positive integer'),
    ('train__max_scored_tokens', -1, 'config.train.max_scored_tokens: must be an integer >= 0'),
    ('train__max_scored_tokens', 4096, 'config.train.max_scored_tokens: 4096 is not below'),
    ('checkpoint__keep', 0, 'config.checkpoint.keep: must be >= 1'),
    ('optimizer__lr', -1.0, 'config.optimizer.lr: must be positive'),
])
def test_bad_values_name_key(key, value, expect):
  msg = _errors(_tiny(**{key: value}))
  assert expect in msg and 'Fix:' in msg


def test_custom_stage_needs_a_valid_regex():
  assert 'config.train.trainable: is empty' in _errors(_tiny(train__stage='custom'))
  msg = _errors(_tiny(train__stage='custom', train__trainable='decoder/(layers'))
  assert 'config.train.trainable' in msg and 'not a valid regex' in msg


def test_unknown_keys_and_wrong_types():
  config = tiny.get_config()
  # Configs come locked: a mistyped key fails where it is set...
  with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
    config.train.batch_sise = 4
  # ...and validation names it in a config that was not locked.
  with config.unlocked():
    config.train.batch_sise = 4
    config.data.templat = 'plain'
  msg = _errors(config)
  assert 'config.train.batch_sise: unknown key. Fix: did you mean train.batch_size?' in msg
  assert 'did you mean data.template?' in msg
  # A config rebuilt from JSON (e.g. an edited config.json) is not type-checked by
  # ConfigDict itself.
  raw = tiny.get_config().to_dict()
  raw['train']['batch_size'] = '8'
  raw['optimizer']['lr'] = 'fast'
  raw['model']['scan_layers'] = 1
  msg = _errors(ml_collections.ConfigDict(raw))
  assert "config.train.batch_size: expected int, got str '8'" in msg
  assert "config.optimizer.lr: expected float, got str 'fast'" in msg
  assert 'config.model.scan_layers: expected bool, got int 1' in msg


def test_all_problems_reported_at_once():
  msg = _errors(_tiny(train__batch_size=12, data__seq_len=8, model__dtype='f32'))
  assert msg.startswith('Invalid config (3 problem(s))')
  for key in ('train.batch_size', 'data.seq_len', 'model.dtype'):
    assert f'config.{key}' in msg


@pytest.fixture(scope='module')
def abstract_params():
  config = tiny.get_config()
  model = models.build(config)
  images = jnp.zeros((1, 1, 32, 32, 3), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)['params']


def test_trainable_stages_match_the_right_parameters(abstract_params):
  paths = validate.param_paths(abstract_params)
  assert len(paths) > 20
  pretrain = validate.validate_trainable(_tiny(train__stage='pretrain'), abstract_params)
  assert pretrain and all(p.startswith('projector/') for p in pretrain)
  assert len(pretrain) == 4  # linear_1, linear_2: kernel + bias each
  finetune = validate.validate_trainable(_tiny(train__stage='finetune'), abstract_params)
  assert any(p.startswith('decoder/') for p in finetune)
  assert not any(p.startswith('vision/') for p in finetune)
  full = validate.validate_trainable(_tiny(train__stage='full'), abstract_params)
  assert sorted(full) == sorted(paths)


def test_trainable_pattern_matching_nothing(abstract_params):
  config = _tiny(train__stage='custom', train__trainable='^visoin/')
  start = time.perf_counter()
  with pytest.raises(ValueError) as info:
    validate.validate_trainable(config, abstract_params)
  assert time.perf_counter() - start < 3.0
  msg = str(info.value)
  assert "config.train.trainable: the trainable pattern '^visoin/'" in msg
  assert 'matches none of the' in msg and "'vision'" in msg and 'Fix:' in msg
  config = _tiny(train__stage='custom', train__trainable='lm_head')
  assert validate.validate_trainable(config, abstract_params) == ['decoder/lm_head/kernel']


def test_unknown_projector_kind_is_one_line_naming_the_valid_kinds():
  """Issue 27 item 12: it was reported twice, the second time with a misleading fix."""
  msg = _errors(_tiny(model__projector__kind='conv'))
  lines = [l for l in msg.splitlines() if l.strip().startswith('- ')]
  assert len(lines) == 1, msg
  assert lines[0].startswith("  - config.model.projector.kind: ") and "'conv'" in lines[0]
  for kind in ('linear', 'downsample_mlp', 'identity'):
    assert kind in lines[0]
  assert 'visual tokens' not in msg and 'select' not in msg


def test_boolean_colon_arg_accepts_only_booleans():
  """Issue 27 item 9: `scan=ture` silently meant False."""
  for word, want in (('true', True), ('TRUE', True), ('yes', True), ('1', True),
                     ('false', False), ('No', False), ('0', False)):
    assert tiny.get_config(f'scan={word}').model.scan_layers is want
  for word in ('ture', 'fals', 'on', '', '2'):
    with pytest.raises(ValueError, match=f"Config arg scan='{word}' is not a boolean"):
      tiny.get_config(f'scan={word}')
  with pytest.raises(ValueError, match="Config arg kv_heads='two' is not int"):
    tiny.get_config('kv_heads=two')


def test_saved_configs_of_the_old_layout_upgrade_to_dataset_groups():
  """A run's config.json written before config.data.shapes.* validates once upgraded."""
  from lvm import config as lvm_config  # pylint: disable=g-import-not-at-top
  raw = tiny.get_config().to_dict()
  del raw['data']['shapes'], raw['data']['llava_json']
  raw['data'].update(shapes_train=96, shapes_turns=2, shapes_vocab_size=0,
                     validation_fraction=0.25)
  config = lvm_config.upgrade(ml_collections.ConfigDict(raw))
  assert 'shapes_train' not in config.data and 'validation_fraction' not in config.data
  assert (config.data.shapes.train, config.data.shapes.turns) == (96, 2)
  assert config.data.shapes.test == 1000  # not saved: the registered default
  assert config.data.llava_json.validation_fraction == 0.25
  validate.validate_config(config, 8)
  assert lvm_config.upgrade(tiny.get_config()).to_dict() == tiny.get_config().to_dict()
