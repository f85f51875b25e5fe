"""Training: loss, the jitted train/eval steps, sharded state creation, and the loop.

The train state is a plain dict `{'step': int32[], 'params': model params,
'opt_state': optimizer state of the trainable subtree}`. Frozen parameters live in
`params` too but are split off inside the step: gradients are taken only with respect
to the trainable subtree, the optimizer never sees the frozen one, and it is returned
unchanged (bit-identical, and aliased through donation).

Letters: B global batch, L sequence length, V vocabulary.
"""

import functools
import math
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lvm import checkpoint as ckpt_lib
from lvm import metrics as metrics_lib
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import validate

class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


# ---------------------------------------------------------------------------
# Loss and steps (pure functions).


def scored_positions(loss_mask, count: int):
  """The first `count` positions of each row whose next token is a supervised target.

  Args:
    loss_mask: bool[B, L] (True where the token at t is a supervised target).
    count: P, a static bound on the supervised targets of a row.

  Returns:
    (positions int32[B, P], valid bool[B, P], unscored int32[]: supervised targets past
    the first P of their row, which a correct bound leaves at 0).
  """
  supervised = loss_mask[:, 1:].astype(bool)  # position t predicts token t + 1
  # A stable sort puts each row's supervised positions first, in order.
  positions = jnp.argsort(jnp.logical_not(supervised).astype(jnp.int8), axis=1,
                          stable=True)[:, :count].astype(jnp.int32)
  valid = jnp.take_along_axis(supervised, positions, axis=1)
  unscored = (jnp.sum(supervised, dtype=jnp.int32) - jnp.sum(valid, dtype=jnp.int32))
  return positions, valid, unscored


def first_argmax(logits):
  """jnp.argmax(logits, axis=-1) (the first index of the maximum) as a max and a min.

  Two plain reductions instead of XLA's variadic (value, index) one, which the CPU runs
  unvectorized: 2.5 against 6.5 ms on the cpu_small logits (docs/performance.md). The
  float32 index is exact below 2**24 entries; larger vocabularies take jnp.argmax.
  """
  if logits.shape[-1] >= 2 ** 24:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
  first = jnp.min(jnp.where(logits == top, index, float(logits.shape[-1])), axis=-1)
  return first.astype(jnp.int32)


def token_losses(logits, batch, scored=None):
  """Next-token cross-entropy terms in float32.

  Args:
    logits: float[B, L, V]; position t predicts token t+1. With `scored`: float[B, P, V],
      the logits at the scored positions only.
    batch: dict with `input_ids` int[B, L] and `loss_mask` bool[B, L] (True where the
      token at t is a supervised target).
    scored: optional (positions int[B, P], valid bool[B, P]) from `scored_positions`.

  Returns:
    (nll, log_z, correct, mask), float[B, L-1] / bool[B, L-1] each ([B, P] with `scored`).
  """
  logits = logits.astype(jnp.float32)
  ids = batch['input_ids']
  if scored is None:
    # Every position is scored against the next token (the last against a dummy 0) and
    # the [B, L] results are sliced, rather than slicing the [B, L, V] logits: their
    # gradient then needs no pad (a full extra pass over [B, L, V] on CPU).
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mask = batch['loss_mask'][:, 1:].astype(bool)
  else:
    positions, mask = scored
    targets = jnp.take_along_axis(ids, positions + 1, axis=1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = first_argmax(logits) == targets
  terms = (log_z - target_logit, log_z, correct)
  if scored is None:
    terms = tuple(x[:, :-1] for x in terms)
  return (*terms, mask)


def apply_model(model, params, batch, logit_positions=None):
  """Logits of a right-padded batch (what lvm.data makes: tokens first, padding after).

  No attention mask is passed: under the causal mask a real token never sees the padding
  after it, so its logits are the same with or without `attention_mask`, and without one
  fused attention (cuDNN flash) takes its causal path instead of reading a [B, 1, L, L] mask
  and computing the masked half (measured on an H100: docs/performance.md).
  """
  images = batch.get('images')
  if images is not None and images.shape[1] == 0:
    images = None
  return model.apply({'params': params}, images, batch['input_ids'],
                     logit_positions=logit_positions)


def loss_fn(params, batch, *, model, num_tokens, z_loss: float = 0.0, scored_tokens: int = 0):
  """Summed supervised loss divided by the global supervised-token count.

  Args:
    params: the full model parameters.
    batch: a (micro)batch: images float[b, N, H, W, 3], input_ids int[b, L],
      loss_mask bool[b, L], attention_mask bool[b, L].
    model: the LLaVA module.
    num_tokens: the supervised-token count of the whole global batch (all
      microbatches), so that accumulation and sharding give the same normalization.
    z_loss: weight of the log(Z)^2 regularizer.
    scored_tokens: P > 0: the LM head runs only at each row's first P supervised
      positions (`scored_positions`); 0: at every position.

  Returns:
    (loss, aux) with aux = {'nll_sum', 'correct', 'unscored'}: sums over the (micro)batch.
  """
  scored, unscored = None, jnp.zeros((), jnp.int32)
  if scored_tokens:
    positions, valid, unscored = scored_positions(batch['loss_mask'], scored_tokens)
    scored = (positions, valid)
  logits = apply_model(model, params, batch, None if scored is None else scored[0])
  nll, log_z, correct, mask = token_losses(logits, batch, scored)
  nll_sum = jnp.sum(jnp.where(mask, nll, 0.0))
  total = nll_sum
  if z_loss:
    total = total + z_loss * jnp.sum(jnp.where(mask, log_z ** 2, 0.0))
  aux = {'nll_sum': nll_sum, 'correct': jnp.sum(correct & mask).astype(jnp.float32),
         'unscored': unscored.astype(jnp.float32)}
  return total / num_tokens, aux


def _microbatches(batch, accum_steps: int):
  """[B, ...] -> [A, B/A, ...] taking every A-th row, so each device keeps its rows."""
  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(split, batch)


def train_step(state, batch, *, model, tx, trainable: str, z_loss: float = 0.0,
               accum_steps: int = 1, scored_tokens: int = 0):
  """One optimizer step on a global batch (jit it with `functools.partial`).

  Args:
    state: {'step', 'params', 'opt_state'}.
    batch: global arrays sharded over the batch axes (see `loss_fn`).
    model: the LLaVA module.
    tx: the optimizer for the trainable subtree.
    trainable: regex of trainable parameter paths.
    z_loss: z-loss weight.
    accum_steps: microbatches per step; gradients are summed, then normalized once.
    scored_tokens: `loss_fn`'s bound on scored positions per row (0: every position).

  Returns:
    (new state, metrics dict of float32 scalars).
  """
  params, frozen = optim.split(state['params'], trainable)
  num_tokens = jnp.maximum(jnp.sum(batch['loss_mask'][:, 1:].astype(jnp.float32)), 1.0)

  def loss(p, mb):
    return loss_fn(optim.merge(p, frozen), mb, model=model, num_tokens=num_tokens,
                   z_loss=z_loss, scored_tokens=scored_tokens)

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  if accum_steps == 1:
    (total, aux), grads = grad_fn(params, batch)
  else:
    def body(carry, mb):
      (t, a), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (t, a, g)), None
    zeros = (jnp.zeros((), jnp.float32),
             {'nll_sum': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.float32),
              'unscored': jnp.zeros((), jnp.float32)},
             jax.tree.map(jnp.zeros_like, params))
    (total, aux, grads), _ = jax.lax.scan(body, zeros, _microbatches(batch, accum_steps))
  updates, opt_state = tx.update(grads, state['opt_state'], params)
  params = optax.apply_updates(params, updates)
  new_state = {'step': state['step'] + 1, 'params': optim.merge(params, frozen),
               'opt_state': opt_state}
  metrics = {
      'loss': aux['nll_sum'] / num_tokens,
      'total_loss': total,
      'token_accuracy': aux['correct'] / num_tokens,
      'grad_norm': optax.tree.norm(grads),
      'supervised_tokens': num_tokens,
      'unscored_tokens': aux['unscored'],
  }
  return new_state, metrics


def eval_sums(logits, batch):
  """Evaluation sums for one batch; answer exact match is teacher-forced.

  An answer is a maximal run of supervised positions (one assistant turn and its
  end-of-turn token). It is an exact match when the argmax at each of its positions is
  the target. With the true conversation history as prefix this is the same event as
  greedy decoding reproducing the answer exactly, because each decoding step then sees
  the right prefix. Rows without supervised tokens (padding rows) count for nothing.

  Args:
    logits: float[B, L, V].
    batch: input_ids int[B, L], loss_mask bool[B, L].

  Returns:
    dict of float32 sums: nll_sum, tokens, correct_tokens, answers, exact_answers,
    examples, exact_examples (rows whose every answer is exact).
  """
  nll, _, correct, mask = token_losses(logits, batch)
  b, t = mask.shape
  starts = mask & ~jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
  # Id of each position's answer across the batch; unsupervised positions go to a spare id.
  answer = jnp.cumsum(starts, axis=1) - 1 + jnp.arange(b)[:, None] * t
  answer = jnp.where(mask, answer, b * t)
  wrong = (mask & ~correct).astype(jnp.int32)
  answer_wrong = jax.ops.segment_max(wrong.reshape(-1), answer.reshape(-1),
                                     num_segments=b * t + 1)[:-1]
  num_answers = jnp.sum(starts)
  has_answer = jnp.any(mask, axis=1)
  row_exact = jnp.all(correct | ~mask, axis=1) & has_answer
  f32 = lambda x: jnp.sum(x).astype(jnp.float32)
  return {'nll_sum': jnp.sum(jnp.where(mask, nll, 0.0)), 'tokens': f32(mask),
          'correct_tokens': f32(correct & mask), 'answers': f32(num_answers),
          'exact_answers': f32(num_answers) - f32(jnp.maximum(answer_wrong, 0)),
          'examples': f32(has_answer), 'exact_examples': f32(row_exact)}


def eval_step(params, batch, *, model):
  """`eval_sums` of the model's logits on one batch."""
  return eval_sums(apply_model(model, params, batch), batch)


# ---------------------------------------------------------------------------
# Sharded state creation.


def dummy_inputs(config, batch_size: int):
  """Zero images float[B, N, H, W, 3] (or None) and ids int[B, L] for tracing init."""
  v = config.model.vision
  n = int(config.data.max_images)
  images = jnp.zeros((batch_size, n, v.image_size, v.image_size, 3), jnp.float32) if n else None
  ids = jnp.zeros((batch_size, config.data.seq_len), jnp.int32)
  return images, ids


def opt_state_shardings(abstract_opt, params, param_shardings, replicated):
  """Shardings of an optimizer state: a leaf shaped like a parameter takes its sharding.

  A leaf is matched to a parameter by the parameter-tree keys its path ends with (Adam's
  `mu/decoder/layers/...`, also inside `multi_transform`'s per-label states) and by shape;
  counts and other leaves are replicated. (`optax.tree_map_params` cannot be used: it calls
  `multi_transform`'s label function on a placeholder instead of the parameters.)
  """
  flat_params = {tuple(k.key for k in path): (leaf.shape, sh) for (path, leaf), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))}

  def sharding_of(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    for start in range(len(keys)):
      shape_sharding = flat_params.get(tuple(keys[start:]))
      if shape_sharding is not None and shape_sharding[0] == leaf.shape:
        return shape_sharding[1]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt)


class StateFactory:
  """Abstract-first sharded train state for one config, mesh and optimizer.

  Attributes:
    param_shardings, shardings: NamedSharding trees for params and the whole state.
    abstract: the state as `jax.ShapeDtypeStruct`s carrying their shardings.
  """

  def __init__(self, config, model, tx, mesh, axis_rules):
    self.config, self.model, self.tx, self.mesh = config, model, tx, mesh
    self.rules = axis_rules
    self.trainable = optim.trainable_regex(config.train)
    batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    images, ids = dummy_inputs(config, batch)

    def init_boxed(rng):
      return model.init(rng, images, ids)['params']

    self._init_inputs = images, ids
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    self.param_shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
    abstract_params = nn.unbox(boxed)
    # A stage that trains nothing fails here, before any compile, naming the key and fix.
    validate.validate_trainable(config, abstract_params)
    trainable, _ = optim.split(abstract_params, self.trainable)
    trainable_shardings, _ = optim.split(self.param_shardings, self.trainable)
    abstract_opt = jax.eval_shape(tx.init, trainable)
    rep = sharding.replicated(mesh)
    opt_shardings = opt_state_shardings(abstract_opt, trainable, trainable_shardings, rep)
    self.shardings = {'step': rep, 'params': self.param_shardings, 'opt_state': opt_shardings}
    abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
                'opt_state': abstract_opt}
    self.abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.shardings)

  @property
  def abstract_params(self):
    return self.abstract['params']

  def random_params(self, rng):
    """Randomly initialized params, created directly in their shardings."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(lambda r: models.random_params(self.config.model, r, *self._init_inputs),
                     out_shardings=self.param_shardings)(rng)

  def from_params(self, params):
    """A fresh state (step 0, new optimizer state) around the given params."""
    def make(p):
      return {'step': jnp.zeros((), jnp.int32), 'params': p,
              'opt_state': self.tx.init(optim.split(p, self.trainable)[0])}
    return jax.jit(make, in_shardings=(self.param_shardings,), out_shardings=self.shardings,
                   donate_argnums=(0,))(params)


def jit_train_step(factory: StateFactory, example_batch, *, z_loss: float = 0.0,
                   accum_steps: int = 1, scored_tokens: int = 0):
  """`train_step` jitted with in/out shardings and the state donated.

  Args:
    factory: gives the model, optimizer, trainable regex and state shardings.
    example_batch: a batch (or its abstract shapes) to derive the batch shardings from.
  """
  step_fn = functools.partial(train_step, model=factory.model, tx=factory.tx,
                              trainable=factory.trainable, z_loss=z_loss,
                              accum_steps=accum_steps, scored_tokens=scored_tokens)
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(factory.mesh, x.ndim),
                                 example_batch)
  jitted = jax.jit(step_fn, in_shardings=(factory.shardings, batch_shardings),
                   out_shardings=(factory.shardings, sharding.replicated(factory.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(factory.mesh), nn.logical_axis_rules(factory.rules):
      return jitted(state, batch)

  return run


def overlay_params(base, loaded, source: str):
  """Replaces leaves of `base` by those of `loaded` (same paths, same shapes).

  Returns:
    (params, number of leaves taken from `loaded`).
  """
  base_flat, loaded_flat = optim.flatten(base), optim.flatten(loaded)
  unknown = sorted(set(loaded_flat) - set(base_flat))
  if unknown:
    raise ValueError(f'{source}: {len(unknown)} parameters do not exist in this model '
                     f'(e.g. {unknown[:3]}); check config.model against that checkpoint.')
  for key, value in loaded_flat.items():
    if tuple(value.shape) != tuple(base_flat[key].shape):
      raise ValueError(f'{source}: parameter {key} has shape {tuple(value.shape)} but '
                       f'config.model gives {tuple(base_flat[key].shape)}.')
  out = dict(base_flat)
  for key, value in loaded_flat.items():
    out[key] = jax.device_put(jnp.asarray(value, base_flat[key].dtype), base_flat[key].sharding)
  return optim.unflatten(out), len(loaded_flat)


def initial_params(config, factory: StateFactory, log: Callable[[str], None] = print):
  """Parameters to start from, as `config.init.kind` says (random | hf | hf_parts | checkpoint)."""
  init = config.init
  rng = jax.random.key(config.train.seed)
  params = factory.random_params(rng)
  if init.kind == 'random':
    return params
  if init.kind == 'checkpoint':
    if not init.path:
      raise ValueError('config.init.kind="checkpoint" needs config.init.path: an earlier '
                       "run's workdir or checkpoint step folder.")
    # Restore only the leaves this model has, straight into this mesh's shardings.
    _, loaded = ckpt_lib.load_params(init.path, factory.abstract_params)
    params, count = overlay_params(params, loaded, f'config.init.path={init.path!r}')
  elif init.kind == 'hf':
    from lvm import hf  # pylint: disable=import-outside-toplevel
    _, loaded = hf.load(init.path, scan_layers=config.model.scan_layers)
    params, count = overlay_params(params, loaded, f'config.init.path={init.path!r}')
  elif init.kind == 'hf_parts':
    from lvm import hf  # pylint: disable=import-outside-toplevel
    m = config.model
    _, loaded = hf.assemble(
        init.vision_path, init.decoder_path, projector=m.projector.kind,
        feature_layer=m.vision.feature_layer, select=m.vision.select,
        image_token_id=m.image_token_id, pad_token_id=m.pad_token_id,
        vocab_size=m.decoder.vocab_size, scan_layers=m.scan_layers)
    # The projector is new in stage 1: keep its random init.
    loaded = {k: v for k, v in loaded.items() if k != 'projector'}
    params, count = overlay_params(params, loaded, 'config.init.vision_path/decoder_path')
  else:
    raise ValueError(f"config.init.kind must be 'random', 'hf', 'hf_parts' or 'checkpoint', "
                     f'got {init.kind!r}')
  log(f'init: {count} parameter arrays from {init.kind} '
      f'({len(optim.flatten(params)) - count} left at random init)')
  return params


# ---------------------------------------------------------------------------
# The loop.


def total_steps(config, num_train_examples: Callable[[], int]) -> int:
  """`train.num_steps` if > 0, else epochs over the train split (rounded up)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  n = num_train_examples()
  return max(1, math.ceil(config.train.num_epochs * n / config.train.batch_size))


def peak_flops() -> float | None:
  """Peak FLOP/s of this host's devices (`lvm.flops.PEAK_TFLOPS`), None where unknown."""
  from lvm import flops  # pylint: disable=import-outside-toplevel
  peak = flops.peak_tflops(jax.devices()[0])
  return None if peak is None else peak * 1e12


def flops_per_step(config, trainable: str) -> float | None:
  """Model FLOPs of one train step (`lvm.flops.per_step`, DESIGN.md's rule)."""
  try:
    from lvm import flops  # pylint: disable=import-outside-toplevel
    return float(flops.per_step(config, config.train.batch_size, config.data.seq_len,
                                int(config.data.max_images), trainable,
                                int(config.train.get('max_scored_tokens', 0))))
  except Exception:  # pylint: disable=broad-except
    return None  # No MFU rather than no training.


def _check_scored(unscored: float, scored_tokens: int, step: int):
  """Stops the run when `train.max_scored_tokens` left supervised targets out of the loss."""
  if unscored:
    raise ValueError(
        f'train.max_scored_tokens={scored_tokens} is below the supervised-token count of a '
        f'row: {unscored:.0f} targets went unscored at step {step}. Raise it to the longest '
        "row's count of supervised tokens, or set 0 to score every position.")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, no preemption checkpoint.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def default_make_iterator(config, split, mesh, *, shuffle=True, num_epochs=None):
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.make_iterator(config, split, mesh, shuffle=shuffle, num_epochs=num_epochs)


def default_num_examples(config, split) -> int:
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.num_examples(config, split)


def _validate(config):
  validate.validate_config(config, jax.device_count(), jax.process_count())


def _prepare_data(config):
  try:
    from lvm import data  # pylint: disable=import-outside-toplevel
    prepare = data.prepare
  except (ImportError, AttributeError):
    return
  prepare(config)


def evaluate(config, params, mesh, split: str, eval_fn, make_iterator) -> dict[str, float]:
  """Loss, token accuracy and answer exact match over `split` (teacher-forced).

  `exact_match` is per answer (see `eval_sums`); `example_exact_match` per conversation.
  """
  iterator = make_iterator(config, split, mesh, shuffle=False, num_epochs=1)
  sums = None
  for i, batch in enumerate(iterator):
    if 0 <= config.train.eval_batches <= i:
      break
    out = eval_fn(params, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError(f'The {split!r} split gave no batches to evaluate.')
  s = {k: float(v) for k, v in jax.device_get(sums).items()}
  tokens, answers = max(s['tokens'], 1.0), max(s['answers'], 1.0)
  return {'loss': s['nll_sum'] / tokens, 'token_accuracy': s['correct_tokens'] / tokens,
          'exact_match': s['exact_answers'] / answers,
          'example_exact_match': s['exact_examples'] / max(s['examples'], 1.0),
          'num_answers': int(s['answers']), 'num_examples': int(s['examples'])}


def train_and_evaluate(config, workdir: str, *, make_iterator=None, num_examples=None) -> dict:
  """Trains and evaluates as `config` says; resumes from `workdir`'s latest checkpoint.

  Args:
    config: the full run config (configs/common.py tree).
    workdir: output folder (config.json, metrics.jsonl, tensorboard/, checkpoints/).
    make_iterator: `(config, split, mesh, *, shuffle, num_epochs) -> iterator` of global
      batches with get_state/set_state; default `lvm.data.pipeline.make_iterator`.
    num_examples: `(config, split) -> int`; default `lvm.data.pipeline.num_examples`.

  Returns:
    The last evaluation records by split ('train' holds the last train metrics).

  Raises:
    NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  start_time = time.time()
  _validate(config)
  external_data = make_iterator is not None
  make_iterator = make_iterator or default_make_iterator
  num_examples = num_examples or default_num_examples
  if not external_data:
    _prepare_data(config)

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config)
  model = models.build(config)
  steps = total_steps(config, lambda: num_examples(config, config.data.train_split))
  accum = int(config.train.grad_accum_steps)
  scored_tokens = int(config.train.get('max_scored_tokens', 0))
  if accum < 1 or config.train.batch_size % accum:
    raise ValueError(f'config.train.grad_accum_steps={accum} must be >= 1 and divide '
                     f'config.train.batch_size={config.train.batch_size}.')
  tx, lr_schedule = optim.make(config.optimizer, steps)
  factory = StateFactory(config, model, tx, mesh, axis_rules)
  writer = metrics_lib.MetricWriter(workdir, steps, start_time)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint)

  train_iter = make_iterator(config, config.data.train_split, mesh, shuffle=True,
                             num_epochs=None)
  # The newest whole checkpoint: a corrupt or partial newest one is reported and set aside.
  restored = checkpointer.restore_latest(factory.abstract, writer.log)
  if restored is not None:
    latest, state, data_state = restored
    if data_state:
      train_iter.set_state(data_state)
    writer.log(f'Resumed from {ckpt_lib.checkpoint_dir(workdir)}/{latest}')
  else:
    state = factory.from_params(initial_params(config, factory, writer.log))

  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(factory.param_shardings, None),
                    out_shardings=sharding.replicated(mesh))
  jit_step = None
  peak = peak_flops()
  step_flops = flops_per_step(config, factory.trainable) if peak else None
  profile = tuple(config.train.profile_steps or ())
  tokens_per_batch = config.train.batch_size * config.data.seq_len

  def run_eval(step, params):
    results = {}
    for split_name, split in (('eval', config.data.eval_split),
                              ('test', config.data.test_split)):
      if not split or (split_name == 'test' and step < steps):
        continue  # The test split is scored once, at the end.
      with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
        m = evaluate(config, params, mesh, split, eval_fn, make_iterator)
      results[split_name] = writer.write(step, split_name, m)
      writer.log(f'step {step} {split_name} ({split}): loss {m["loss"]:.4f} '
                 f'exact_match {m["exact_match"]:.4f} ({m["num_answers"]} answers, teacher-forced)')
    return results

  def save(step, state):
    checkpointer.save(step, state, train_iter.get_state(), config)

  step = int(jax.device_get(state['step']))
  first_step = step
  last = {}
  window = None  # (time, step) of the last fetched metrics
  in_flight = None
  last_skipped = {}
  try:
    with _Preemption() as preemption:
      while step < steps:
        if preemption.agreed():
          writer.log(f'SIGTERM: saving a checkpoint at step {step} and exiting.')
          save(step, state)
          checkpointer.wait()
          return last
        batch = next(train_iter)
        if jit_step is None:
          jit_step = jit_train_step(factory, batch, z_loss=float(config.train.z_loss),
                                    accum_steps=accum, scored_tokens=scored_tokens)
        if profile and step == profile[0] and jax.process_index() == 0:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        state, m = jit_step(state, batch)
        step += 1
        # Stay at most one step ahead of the device, so that a SIGTERM is acted on within
        # a step or two rather than after every queued step has run.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
          if scored_tokens:  # its count is ready now: a scalar read, no extra wait
            _check_scored(float(in_flight), scored_tokens, step - 1)
        in_flight = m['unscored_tokens']
        if profile and step == profile[-1] + 1 and jax.process_index() == 0:
          jax.block_until_ready(m)
          jax.profiler.stop_trace()
        is_log = step % max(config.train.log_every, 1) == 0 or step == steps
        is_save = checkpointer.should_save(step) or step == steps
        is_eval = (config.train.eval_every > 0 and step % config.train.eval_every == 0
                   and step < steps)
        if not (is_log or is_save or is_eval):
          continue
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        _check_scored(m['unscored_tokens'], scored_tokens, step)
        if not math.isfinite(m['loss']) or not math.isfinite(m['total_loss']):
          last_good = checkpointer.latest_step()
          raise NonFiniteLossError(
              f'Loss is {m["loss"]} at step {step} (logged between steps '
              f'{step - config.train.log_every + 1} and {step}); stopping. Parameters after '
              f'this step are not saved; the last good checkpoint is step {last_good} in '
              f'{ckpt_lib.checkpoint_dir(workdir)}. Lower config.optimizer.lr, check '
              'config.optimizer.clip_norm, or inspect the data.')
        now = time.time()
        # Throughput over the steps since the last fetch; the first step (compilation) is
        # never timed.
        if window is not None and step - first_step > 1:
          dt = (now - window[0]) / (step - window[1])
          m['samples_per_sec'] = config.train.batch_size / dt
          m['tokens_per_sec'] = tokens_per_batch / dt
          m['step_time'] = dt
          if step_flops and peak:
            m['mfu'] = step_flops / dt / (peak * jax.device_count())
        window = (now, step)
        m['lr'] = float(lr_schedule(step - 1))
        # Samples the input pipeline skipped so far (this process's rows), by reason.
        skipped = dict(getattr(train_iter, 'stats', None) or {})
        m.update({f'skipped_{reason}': count for reason, count in skipped.items()})
        if skipped != last_skipped:
          writer.log(f'data: samples skipped so far, by reason: {skipped}')
          last_skipped = skipped
        if is_log:
          last['train'] = writer.write(step, 'train', m)
          writer.progress(step, first_step, m['loss'])
          if not writer.interactive:
            writer.log(f'step {step}/{steps} loss {m["loss"]:.4f} lr {m["lr"]:.3g} '
                       f'grad_norm {m["grad_norm"]:.3g}')
        if is_save:
          save(step, state)
        if is_eval:
          last.update(run_eval(step, state['params']))
          window = (time.time(), step)  # Do not count evaluation as training time.
      last.update(run_eval(step, state['params']))
  finally:
    checkpointer.close()
    writer.close()
  return last
