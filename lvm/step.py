"""The pure train and eval steps, and their jitted, sharded forms.

`jit_train_step` is the one compile path of a train step: the training loop runs it and
`lvm.bench` lowers, compiles and times the very same `jax.jit` object (`JittedStep.jitted`).

The train state is a plain dict `{'step': int32[], 'params': model params,
'opt_state': optimizer state of the trainable subtree}`. Frozen parameters live in
`params` too but are split off inside the step: gradients are taken only with respect
to the trainable subtree, the optimizer never sees the frozen one, and it is returned
unchanged (bit-identical, and aliased through donation).
"""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lvm import flops
from lvm import losses
from lvm import optim
from lvm import sharding


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
    batch: global arrays sharded over the batch axes (see `losses.loss_fn`).
    model: the LLaVA module.
    tx: the optimizer for the trainable subtree.
    trainable: regex of trainable parameter paths.
    z_loss: z-loss weight.
    accum_steps: microbatches per step; gradients are summed, then normalized once.
    scored_tokens: `losses.loss_fn`'s bound on scored positions per row (0: every position).

  Returns:
    (new state, metrics dict of float32 scalars).
  """
  params, frozen = optim.split(state['params'], trainable)
  num_tokens = jnp.maximum(jnp.sum(batch['loss_mask'][:, 1:].astype(jnp.float32)), 1.0)

  # LoRA dropout draws its masks from the step number: a resumed run draws the same ones.
  rngs = None
  if getattr(model, 'lora', None) is not None and model.lora.dropout:
    rngs = {'dropout': jax.random.fold_in(jax.random.key(0), state['step'])}

  def loss(p, mb):
    return losses.loss_fn(optim.merge(p, frozen), mb, model=model, num_tokens=num_tokens,
                          z_loss=z_loss, scored_tokens=scored_tokens, rngs=rngs)

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
      # For the logged MFU on real tokens (`lvm.hooks.ReportProgress`).
      **flops.real_counts(batch, scored_tokens),
  }
  return new_state, metrics



def eval_step(params, batch, *, model):
  """`losses.eval_sums` of the model's logits on one batch."""
  return losses.eval_sums(losses.apply_model(model, params, batch), batch)


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """The mesh and logical axis rules a jitted step is traced, lowered and run under."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class JittedStep:
  """A `jax.jit` object with the mesh and axis rules it must be traced under.

  Attributes:
    jitted: the `jax.jit` object (lower it with `lower`, or time `lower(...).compile()`).
    mesh, rules: its mesh and logical axis rules.
  """

  def __init__(self, jitted, mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def context(self):
    return mesh_context(self.mesh, self.rules)

  def lower(self, *args):
    with self.context():
      return self.jitted.lower(*args)

  def __call__(self, *args):
    with self.context():
      return self.jitted(*args)


def step_options(train_config) -> dict:
  """`train_step`'s keyword options from `config.train` (what the trainer and bench use)."""
  return {'z_loss': float(train_config.z_loss),
          'accum_steps': int(train_config.grad_accum_steps),
          'scored_tokens': int(train_config.max_scored_tokens)}


def jit_train_step(factory, example_batch, *, z_loss: float = 0.0, accum_steps: int = 1,
                   scored_tokens: int = 0) -> JittedStep:
  """`train_step` jitted with in/out shardings and the state donated.

  Args:
    factory: a `lvm.state.StateFactory`: the model, optimizer, trainable regex, mesh,
      rules and state shardings.
    example_batch: a batch (or its abstract shapes) to derive the batch shardings from.
    z_loss, accum_steps, scored_tokens: `train_step`'s options (`step_options(config.train)`).
  """
  step_fn = functools.partial(train_step, model=factory.model, tx=factory.tx,
                              trainable=factory.trainable, z_loss=z_loss,
                              accum_steps=accum_steps, scored_tokens=scored_tokens)
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(factory.mesh, x.ndim),
                                 example_batch)
  jitted = jax.jit(step_fn, in_shardings=(factory.shardings, batch_shardings),
                   out_shardings=(factory.shardings, sharding.replicated(factory.mesh)),
                   donate_argnums=(0,))
  return JittedStep(jitted, factory.mesh, factory.rules)


def jit_eval_step(factory) -> JittedStep:
  """`eval_step` jitted with the params' shardings in and replicated sums out."""
  jitted = jax.jit(functools.partial(eval_step, model=factory.model),
                   in_shardings=(factory.param_shardings, None),
                   out_shardings=sharding.replicated(factory.mesh))
  return JittedStep(jitted, factory.mesh, factory.rules)
