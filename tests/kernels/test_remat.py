"""Remat policies mean the same under either kernel: for every policy of
`layers.REMAT_POLICIES`, a tiny decoder gives the same loss and gradients with the CPU
custom-VJP kernels as with the XLA ones, and saves the same residuals (jax traces a custom
VJP's forward rule under remat, so the `dots_*` policies see its dots)."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm.models import decoder as decoder_lib
from lvm.models import layers

POLICIES = sorted(layers.REMAT_POLICIES)
_RESIDUAL = re.compile(r'^(\w+)\[([\d,]*)\] (.*)$')


def _decoder(impl, policy, dtype=jnp.float32, scan=True):
  return decoder_lib.Decoder(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
                             scan_layers=scan, remat_policy=policy, dtype=dtype,
                             attention_impl=impl, matmul_impl=impl)


@pytest.fixture(scope='module')
def inputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  params = nn.unbox(jax.jit(_decoder('xla', 'none').init)(jax.random.PRNGKey(0), x)['params'])
  return x, params


@pytest.mark.parametrize('policy', POLICIES)
def test_loss_and_gradients_equal_under_either_kernel(policy, inputs):
  x, params = inputs
  mask = jnp.array([[True] * 10, [True] * 7 + [False] * 3])  # the masked attention path too

  def loss_and_grads(impl):
    model = _decoder(impl, policy)
    loss = lambda p: jnp.mean(model.apply({'params': p}, x, attention_mask=mask)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (l_cpu, g_cpu), (l_xla, g_xla) = loss_and_grads('cpu'), loss_and_grads('xla')
  np.testing.assert_allclose(l_cpu, l_xla, rtol=1e-6)
  assert np.abs(g_cpu['layers']['self_attn']['q_proj']['kernel']).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_cpu, g_xla)


def _saved(impl, policy, dtype, capsys) -> list[tuple[str, int, str]]:
  """(dtype, element count, what) of each residual the backward keeps, but the arguments."""
  model = _decoder(impl, policy, dtype, scan=False)
  x = jnp.ones((2, 10, 32), dtype)
  params = model.init(jax.random.PRNGKey(0), x)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: model.apply(p, x)[0].astype(jnp.float32).sum(), params)
  saved = []
  for line in capsys.readouterr().out.splitlines():
    m = _RESIDUAL.match(line)
    if m and 'from the argument' not in line:
      shape = [int(d) for d in m.group(2).split(',') if d]
      saved.append((m.group(1), math.prod(shape), m.group(3)))
  return saved


@pytest.mark.parametrize('policy', sorted(set(POLICIES) - {'none'}))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_policies_save_the_same_residuals_under_either_kernel(policy, dtype, capsys):
  cpu, xla = _saved('cpu', policy, dtype, capsys), _saved('xla', policy, dtype, capsys)
  assert len(cpu) == len(xla), (cpu, xla)
  assert sum(n for _, n, _ in cpu) == sum(n for _, n, _ in xla)
  is_dot = lambda what: 'output of dot_general' in what
  dots = lambda saved: sorted(n for _, n, what in saved if is_dot(what))
  others = lambda saved: sorted((d, n) for d, n, what in saved if not is_dot(what))
  assert dots(cpu) == dots(xla)
  assert others(cpu) == others(xla)
  if policy.startswith('dots'):
    assert dots(cpu), 'a dots policy saved no dot'
  # In bfloat16 the dtypes of saved dots differ: a CPU kernel's dot accumulates in float32
  # and is cast after, so remat keeps its float32 output (lvm/kernels/__init__.py).
  if dtype == jnp.float32:
    assert sorted(d for d, _, _ in cpu) == sorted(d for d, _, _ in xla)
