"""lvm/kernels: 'auto' resolves once in models.build, names select registered kernels, and
the kernels' own config checks."""

import pathlib

import pytest

from lvm import config as common
from configs import tiny
from lvm import kernels
from lvm import registry
import lvm.models


@pytest.mark.parametrize('backend,want', [('cpu', 'cpu'), ('gpu', 'xla'), ('tpu', 'xla')])
def test_auto_resolves_by_backend(backend, want):
  assert kernels.resolve('auto', backend) == want


def test_auto_without_a_backend_uses_the_default_device():
  assert kernels.resolve('auto') == 'cpu'  # the tests run on the CPU (conftest)


@pytest.mark.parametrize('name', ['cpu', 'xla', 'cudnn', 'jax'])
def test_other_names_resolve_to_themselves(name):
  assert kernels.resolve(name, 'gpu') == kernels.resolve(name, 'cpu') == name


def test_registered_names():
  assert registry.ATTENTION.names() == ('auto', 'cpu', 'cudnn', 'jax', 'xla')
  assert registry.MATMUL.names() == ('auto', 'cpu', 'xla')


def test_defaults_are_auto():
  model = common.get_config().model
  assert model.attention_impl == model.matmul_impl == 'auto'


def _parts(model):
  return (model.vision, model.vision, model.projector, model.decoder, model.decoder)


@pytest.mark.parametrize('backend,want', [('cpu', 'cpu'), ('gpu', 'xla')])
def test_build_passes_the_resolved_kernels_to_every_part(backend, want):
  model = lvm.models.build(tiny.get_config(), backend=backend)
  impls = [model.vision.matmul_impl, model.vision.attention_impl, model.projector.matmul_impl,
           model.decoder.matmul_impl, model.decoder.attention_impl]
  assert impls == [want] * 5


def test_build_keeps_explicit_names():
  config = tiny.get_config()
  config.model.attention_impl, config.model.matmul_impl = 'cudnn', 'xla'
  model = lvm.models.build(config, backend='cpu')
  assert (model.decoder.attention_impl, model.vision.attention_impl) == ('cudnn', 'cudnn')
  assert (model.decoder.matmul_impl, model.projector.matmul_impl) == ('xla', 'xla')


def test_unknown_kernel_names_fail_at_build_naming_the_key():
  config = tiny.get_config()
  config.model.attention_impl = 'flash'
  with pytest.raises(ValueError, match=r"config\.model\.attention_impl='flash'"):
    lvm.models.build(config)
  config.model.attention_impl, config.model.matmul_impl = 'auto', 'fast'
  with pytest.raises(ValueError, match=r"config\.model\.matmul_impl='fast'"):
    lvm.models.build(config)


def test_a_module_never_sees_auto():
  with pytest.raises(ValueError, match='unresolved'):
    kernels.attention('auto')
  with pytest.raises(ValueError, match='unresolved'):
    kernels.matmul('auto')


def test_models_do_not_look_at_the_backend():
  root = pathlib.Path(lvm.models.__file__).parent
  for path in root.glob('*.py'):
    assert 'default_backend' not in path.read_text(), path


def _problems(config, kind_name, reg):
  problems = registry.Problems()
  kind = reg.get(kind_name)
  if kind.check:
    kind.check(config, problems)
  return problems.lines


def test_cudnn_check_names_backend_dtype_and_head_width():
  config = tiny.get_config()
  config.model.attention_impl = 'cudnn'
  config.model.dtype = 'float32'
  config.model.decoder.head_dim = 12
  lines = _problems(config, 'cudnn', registry.ATTENTION)
  text = '\n'.join(lines)
  assert "needs a GPU, but the backend is 'cpu'" in text  # the tests run on the CPU
  assert "model.dtype is 'float32'" in text
  assert 'config.model.decoder.head_dim: a head width of 12' in text
  config.model.dtype, config.model.decoder.head_dim = 'bfloat16', 16
  assert len(_problems(config, 'cudnn', registry.ATTENTION)) == 1  # only the backend


@pytest.mark.parametrize('name', ['auto', 'cpu', 'xla', 'jax'])
def test_other_kernels_accept_any_model_on_the_cpu(name):
  config = tiny.get_config()
  assert not _problems(config, name, registry.ATTENTION)
  if name in registry.MATMUL:
    assert not _problems(config, name, registry.MATMUL)


def test_a_kernel_registered_in_a_test_is_validated_and_used():
  """A new attention kernel (XLA attention that counts its traces) named by the config:
  validation accepts it, `models.build` hands it to every attention module, and the
  logits equal the 'xla' kernel's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvm import validate  # pylint: disable=g-import-not-at-top
  calls = []
  xla_attention = registry.ATTENTION.get('xla').obj

  def counting(q, k, v, *, mask=None, is_causal=False):
    calls.append(q.shape)
    return xla_attention(q, k, v, mask=mask, is_causal=is_causal)

  registry.ATTENTION.register('counting', counting)
  try:
    config = tiny.get_config()
    config.model.attention_impl = 'counting'
    validate.validate_config(config, 1)
    model = lvm.models.build(config)
    assert model.decoder.attention_impl == model.vision.attention_impl == 'counting'
    images = jnp.ones((1, 1, 32, 32, 3), jnp.float32)
    ids = jnp.arange(20, dtype=jnp.int32)[None]
    params = model.init(jax.random.PRNGKey(0), images, ids)['params']
    logits = model.apply({'params': params}, images, ids)
    d, v = config.model.decoder.depth, config.model.vision.depth
    assert len(calls) >= d + v  # every layer of both towers (init traces them too)
    config.model.attention_impl = 'xla'
    want = lvm.models.build(config).apply({'params': params}, images, ids)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
  finally:
    registry.ATTENTION.unregister('counting')
  config.model.attention_impl = 'counting'
  with pytest.raises(ValueError, match=r"config\.model\.attention_impl: 'counting' is not a "
                                       'registered attention kernel'):
    validate.validate_config(config, 1)


def test_a_matmul_kernel_registered_in_a_test_is_validated_and_used():
  """A new matmul kernel (dot_general that records its shapes): every Dense of the three
  parts uses it, and the logits equal the 'xla' kernel's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvm import validate  # pylint: disable=g-import-not-at-top
  shapes = []
  xla_matmul = registry.MATMUL.get('xla').obj

  def recording(x, kernel, n_in):
    shapes.append(kernel.shape)
    return xla_matmul(x, kernel, n_in)

  registry.MATMUL.register('recording', recording)
  try:
    config = tiny.get_config()
    config.model.matmul_impl = 'recording'
    validate.validate_config(config, 1)
    model = lvm.models.build(config)
    assert model.decoder.matmul_impl == model.vision.matmul_impl == 'recording'
    assert model.projector.matmul_impl == 'recording'
    images = jnp.ones((1, 1, 32, 32, 3), jnp.float32)
    ids = jnp.arange(20, dtype=jnp.int32)[None]
    params = model.init(jax.random.PRNGKey(0), images, ids)['params']
    shapes.clear()
    logits = model.apply({'params': params}, images, ids)
    width = config.model.decoder.width
    assert (width, config.model.decoder.vocab_size) in shapes  # the LM head went through it
    assert any(s[0] == config.model.vision.width for s in shapes)  # so did the tower
    config.model.matmul_impl = 'xla'
    want = lvm.models.build(config).apply({'params': params}, images, ids)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
  finally:
    registry.MATMUL.unregister('recording')
