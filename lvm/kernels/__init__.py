"""Matmul and attention kernels, chosen by config, never by the model sniffing the backend.

`model.matmul_impl` and `model.attention_impl` name registered kernels
(`lvm.registry.MATMUL` / `ATTENTION`):

| name  | matmul                                | attention                                  |
|-------|---------------------------------------|--------------------------------------------|
| cpu   | `cpu_matmul`: 2-D dot, custom VJP     | `cpu_attention`: heads-major, custom VJP   |
| xla   | `jax.lax.dot_general`                 | `jax.nn.dot_product_attention('xla')`      |
| cudnn |                                       | `jax.nn.dot_product_attention('cudnn')`    |
| jax   |                                       | `jax.nn.dot_product_attention(None)`       |
| auto  | `resolve`d once by `lvm.models.build`: 'cpu' on a CPU backend, else 'xla'          |

A matmul kernel is `f(x, kernel, n_in) -> y`, contracting x's last `n_in` dims with
kernel's first `n_in`; an attention kernel is `f(q[B, T, H, Dh], k[B, S, K, Dh], v, *,
mask=None, is_causal=False) -> [B, T, H, Dh]` (GQA when K < H; `mask` bool, broadcastable
to [B, H, T, S], True keeps a key). The modules receive the resolved names as dataclass
fields (`Dense.matmul_impl`, `attention_impl`).

Remat: under `jax.checkpoint` jax traces a custom VJP's forward rule, so the `dots_*`
policies of `lvm.models.layers.REMAT_POLICIES` see the CPU kernels' forward dots as dots and
save the same ones as under 'xla' (tests/kernels/test_remat.py). One difference in bfloat16:
a CPU kernel's dot accumulates in float32 and is cast after, so a saved dot is its float32
output where 'xla' saves the bfloat16 one.
"""

import dataclasses

import jax

from lvm import registry
from lvm.kernels import cpu_attention, cpu_matmul, xla  # noqa: F401  (they register)

AUTO = 'auto'
# Backend -> what 'auto' selects there (the CPU kernels were measured faster on the CPU,
# docs/performance.md); any other backend gets 'xla'.
_AUTO_BY_BACKEND = {'cpu': 'cpu'}


def resolve(name: str, backend: str | None = None) -> str:
  """The kernel name `name` stands for: 'auto' -> 'cpu' on a CPU backend, else 'xla';
  every other name as given.

  Args:
    name: a config value of `model.matmul_impl` / `model.attention_impl`.
    backend: 'cpu', 'gpu', 'tpu'...; None: the default device's (`jax.default_backend()`).
  """
  if name != AUTO:
    return name
  return _AUTO_BY_BACKEND.get(backend or jax.default_backend(), 'xla')


@dataclasses.dataclass(frozen=True)
class Impls:
  """The resolved kernel names a model is built with."""
  matmul: str
  attention: str


def resolve_impls(model_config, backend: str | None = None) -> Impls:
  """`resolve` of `model.matmul_impl` and `model.attention_impl` (checked to be registered).

  Args:
    model_config: `config.model`.
    backend: as in `resolve`.
  """
  impls = Impls(resolve(model_config.matmul_impl, backend),
                resolve(model_config.attention_impl, backend))
  for reg, name in ((registry.MATMUL, impls.matmul), (registry.ATTENTION, impls.attention)):
    _kernel(reg, name)  # an unknown name fails here, at build, naming its config key
  return impls


def _kernel(reg: registry.Registry, name: str):
  if name == AUTO:
    raise ValueError(f"config.{reg.config_key}='auto' reached a module unresolved; "
                     'lvm.models.build resolves it (lvm.kernels.resolve)')
  return reg.get(name).obj


def matmul(name: str):
  """The matmul kernel registered as `name` (resolved, not 'auto')."""
  return _kernel(registry.MATMUL, name)


def attention(name: str):
  """The attention kernel registered as `name` (resolved, not 'auto')."""
  return _kernel(registry.ATTENTION, name)


def _check_auto(reg: registry.Registry):
  def check(config, problems: registry.Problems):
    """The checks of the kernel 'auto' resolves to on this backend."""
    kind = reg.get(resolve(AUTO))
    if kind.check:
      kind.check(config, problems)
  return check


# 'auto' is registered (as `resolve`) so that validation accepts it and runs the checks of
# the kernel it becomes here; `matmul` / `attention` refuse it.
registry.MATMUL.register(AUTO, resolve, check=_check_auto(registry.MATMUL))
registry.ATTENTION.register(AUTO, resolve, check=_check_auto(registry.ATTENTION))
