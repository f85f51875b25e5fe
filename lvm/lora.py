"""LoRA: low-rank adapters on the Dense layers a regex selects, unmerged, beside their base.

A targeted `Dense` computes `y = x @ W (+ b) + scale * ((dropout(x) @ A) @ B)` with
`A float[*in, r]` (uniform +-1/sqrt(fan_in), PEFT's kaiming init) and `B float[r, *out]`
(zeros), so a fresh adapter changes nothing. The adapters are parameters `lora_a` and
`lora_b` of the Dense module itself, beside `kernel`
(`decoder/layers/self_attn/q_proj/lora_a`): they are stacked on `layers` under scan, split
per layer when unrolled, remat'ed with their block, cast with the block's precast weights,
and sharded by the base weight's logical axes (A takes the kernel's input axes, B its
output axes; the rank axis `lora_rank` is replicated).

No model code changes for this: `LLaVA` runs its parts under `adapters(spec)`, a flax
method interceptor that adds the low-rank term to each `Dense.__call__` whose module path
(`decoder/layers/mlp/up_proj`, or `layers_3` unrolled) matches `config.lora.targets`. A
fused projection (`fuse_projections`, which asks its Dense for its kernel only) gets the
merged kernel `W + scale * A @ B` instead, the same function.

Training: base weights are frozen and carry no optimizer state (`trainable_regex`); the
checkpoint holds the trainable parameters only (`config.lora.save_base`), the base being
rebuilt from `config.init` on resume and load (`complete_params`). Export merges
(`merge`) or writes a PEFT folder (`lvm.hf.peft`).
"""

import contextlib
import dataclasses
import math
import re
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm import kernels

LEAVES = ('lora_a', 'lora_b')
# Matches the '/'-joined path of an adapter parameter.
ADAPTER_REGEX = r'/lora_[ab]$'
RANK_AXIS = 'lora_rank'  # logical name of the rank axis (no rule: replicated)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What `config.lora` asks of the model (hashable: a module field)."""
  targets: str
  rank: int
  alpha: float
  dropout: float = 0.0
  rslora: bool = False

  @property
  def scale(self) -> float:
    """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def spec(config) -> Spec | None:
  """The `Spec` of a full run config, or None when LoRA is off (or `config` is a model
  config, which has no `lora` group)."""
  if 'lora' not in config or not config.lora.enable:
    return None
  c = config.lora
  return Spec(targets=c.targets, rank=int(c.rank), alpha=float(c.alpha),
              dropout=float(c.dropout), rslora=bool(c.rslora))


def is_adapter(path: str) -> bool:
  return re.search(ADAPTER_REGEX, path) is not None


def _a_init(key, shape, dtype):
  """PEFT's `kaiming_uniform_(a=sqrt(5))`: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _interceptor(s: Spec):
  # Imported here: lvm.models imports this module (LLaVA's `lora` field).
  from lvm.models import layers  # pylint: disable=import-outside-toplevel
  pattern = re.compile(s.targets)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (not isinstance(module, layers.Dense) or context.method_name != '__call__'
        or not pattern.search('/'.join(module.path))):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0]
    n_in = len(module.in_axes)
    features = ((module.features,) if isinstance(module.features, int)
                else tuple(module.features))
    a = layers.param_with_axes(module, 'lora_a', _a_init, (*x.shape[-n_in:], s.rank),
                               (*module.in_axes, RANK_AXIS), module.param_dtype)
    b = layers.param_with_axes(module, 'lora_b', nn.initializers.zeros, (s.rank, *features),
                               (RANK_AXIS, *module.out_axes), module.param_dtype)
    a, b = a.astype(module.dtype), b.astype(module.dtype)
    if kwargs.get('kernel_only'):  # the caller multiplies: give it the merged kernel
      delta = jnp.tensordot(a, b, axes=1) * jnp.asarray(s.scale, module.dtype)
      return y + delta.astype(y.dtype)
    h = x.astype(module.dtype)
    if s.dropout and module.has_rng('dropout'):  # training passes a dropout rng
      keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - s.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - s.dropout), 0).astype(h.dtype)
    matmul = kernels.matmul(module.matmul_impl)
    delta = matmul(matmul(h, a, n_in), b, 1)
    return y + (delta * jnp.asarray(s.scale, delta.dtype)).astype(y.dtype)

  return intercept


_active = threading.local()


@contextlib.contextmanager
def adapters(s: Spec | None):
  """Runs the Dense layers under it with `s`'s adapters (nothing when `s` is None, or
  when adapters are already active: calls may nest)."""
  if s is None or getattr(_active, 'on', False):
    yield
    return
  _active.on = True
  try:
    with nn.intercept_methods(_interceptor(s)):
      yield
  finally:
    _active.on = False


# --- training -------------------------------------------------------------------------

def trainable_regex(config) -> str:
  """The trainable-parameter regex of a run: the stage's (`lvm.optim.trainable_regex`);
  with LoRA on, only adapters and `config.lora.train_full` within it (base weights frozen).
  """
  from lvm import optim  # pylint: disable=import-outside-toplevel
  stage = optim.trainable_regex(config.train)
  if spec(config) is None:
    return stage
  full = config.lora.train_full
  inner = f'{ADAPTER_REGEX}|{full}' if full else ADAPTER_REGEX
  # Both must match somewhere (re.search semantics, '^' and '$' of each kept).
  return rf'^(?=[\s\S]*?(?:{stage}))(?=[\s\S]*?(?:{inner}))'


def saves_base(config) -> bool:
  """Whether checkpoints hold the frozen base weights too (always without LoRA)."""
  return spec(config) is None or bool(config.lora.save_base)


def check(config, abstract_params: dict, problems) -> None:
  """Adds a line to `problems` (a `registry.Problems`) for each LoRA fault of `config`
  against the model's parameter shapes (`'/'`-joined path -> shape), before compiling."""
  s = spec(config)
  if s is None:
    return
  from lvm import optim  # pylint: disable=import-outside-toplevel
  targets = [p[:-len('/lora_a')] for p in abstract_params if p.endswith('/lora_a')]
  if not targets:
    kernels_ = sorted(p[:-len('/kernel')] for p in abstract_params if p.endswith('/kernel'))
    problems.add('lora.targets', f'{s.targets!r} matches no Dense layer (layers: '
                 f'{kernels_[:6]}{" ..." if len(kernels_) > 6 else ""})',
                 'give a regex over such module paths, e.g. '
                 r"'^decoder/layers(_\d+)?/(self_attn|mlp)/\w+_proj$'")
    return
  for path in targets:
    kernel = abstract_params[path + '/kernel']
    a, b = abstract_params[path + '/lora_a'], abstract_params[path + '/lora_b']
    lead = _stacked_axes(kernel, a, b)
    n_in = len(a) - 1 - lead
    fan_in = math.prod(kernel[lead:lead + n_in])
    fan_out = math.prod(kernel[lead + n_in:])
    if s.rank > min(fan_in, fan_out):
      problems.add('lora.rank', f'{s.rank} exceeds the dimensions of {path}/kernel '
                   f'({fan_in} x {fan_out}): the adapter would not be low-rank',
                   f'use a rank <= {min(fan_in, fan_out)} or leave {path} out of '
                   'config.lora.targets')
      break
  pattern = re.compile(trainable_regex(config))
  stage = re.compile(optim.trainable_regex(config.train))
  frozen = [t for t in targets if not stage.search(t + '/lora_a')]
  if frozen and len(frozen) == len(targets):
    problems.add('lora.targets', f'every layer it selects ({frozen[:3]} ...) is frozen by '
                 f'config.train.stage={config.train.stage!r}, so no adapter would train',
                 'target layers the stage trains, or choose a stage that trains them (e.g. '
                 "stage='finetune' for the decoder)")
  if not any(pattern.search(p) for p in abstract_params):
    problems.add('lora.train_full', 'with the stage and the targets, nothing trains',
                 'fix config.lora.targets / config.lora.train_full / config.train.stage')
  if config.model.fuse_projections and s.dropout:
    problems.add('lora.dropout', 'is not applied where fuse_projections merges the adapter '
                 'into the fused kernel', 'set config.model.fuse_projections=False or '
                 'config.lora.dropout=0')


# --- merging and loading ----------------------------------------------------------------

def merge(params: dict, s: Spec) -> dict:
  """Params without adapters: each adapted kernel becomes `W + scale * A @ B` (float32
  math, stored in W's dtype). Works on nested or '/'-joined trees of arrays."""
  from lvm import optim  # pylint: disable=import-outside-toplevel
  nested = not all(isinstance(k, str) and '/' in k for k in params)
  flat = optim.flatten(params) if nested else dict(params)
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for key in flat:
    if not key.endswith('/lora_a'):
      continue
    base = key[:-len('/lora_a')]
    w = np.asarray(flat[base + '/kernel'])
    a = np.asarray(flat[key], np.float32)
    b = np.asarray(flat[base + '/lora_b'], np.float32)
    if _stacked_axes(w.shape, a.shape, b.shape):  # [L, *in, r] x [L, r, *out]
      delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
    else:
      delta = np.tensordot(a, b, axes=1)
    out[base + '/kernel'] = (w.astype(np.float32) + s.scale * delta).astype(w.dtype)
  return optim.unflatten(out) if nested else out


def _stacked_axes(kernel_shape, a_shape, b_shape) -> int:
  """Leading layer axes (1 under scan, else 0) that a kernel shares with its adapters:
  kernel [*L, *in, *out], A [*L, *in, r], B [*L, r, *out]."""
  return len(a_shape) + len(b_shape) - 2 - len(kernel_shape)


def strip(params: dict) -> dict:
  """Params without their adapter leaves (nested)."""
  from lvm import optim  # pylint: disable=import-outside-toplevel
  return optim.unflatten({k: v for k, v in optim.flatten(params).items() if not is_adapter(k)})


def complete_params(config, saved: dict, target=None, log=print) -> dict:
  """A LoRA run's full params: its saved (trainable) ones over the base it started from.

  A checkpoint of a LoRA run holds only the adapters and the modules trained in full
  (unless `config.lora.save_base`); the frozen base is `config.init`'s, rebuilt here as
  training built it (the same seed for a random base).

  Args:
    config: the run's config.
    saved: the restored params (nested), possibly a subset.
    target: the abstract full params with shardings to place the result on, or None
      (the first local device).

  Raises:
    ValueError: a saved leaf that the model does not have or of another shape, naming it.
  """
  from lvm import models, optim, sharding, state  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  if target is not None:
    mesh = jax.tree.leaves(target)[0].sharding.mesh
  else:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {'data': 1, 'fsdp': 1, 'tensor': 1}), jax.local_devices()[:1])
  tx = optim.make(config.optimizer, 1)[0]
  factory = state.StateFactory(config, models.build(config), tx, mesh,
                               sharding.rules(config))
  base = state.initial_params(config, factory, log)
  params, _ = state.overlay_params(base, saved, 'LoRA checkpoint')
  return params
