"""The training loop: `train_and_evaluate(config, workdir)`.

The pieces live in their own modules: token losses and evaluation sums in `lvm.losses`,
the pure steps and their jitted forms in `lvm.step`, the sharded train state in
`lvm.state`, and the periodic work between steps (logging, throughput and MFU, profiling,
evaluation, checkpoints, preemption, NaN stop) as hooks in `lvm.hooks`.
"""

import math
import time
from typing import Callable

from etils import epath
import jax
import numpy as np

from lvm import checkpoint as ckpt_lib
from lvm import console
from lvm import hooks as hooks_lib
from lvm import metrics as metrics_lib
from lvm import models
from lvm import optim
from lvm import sharding
from lvm import state as state_lib
from lvm import step as step_lib
from lvm import validate


def total_steps(config, num_train_examples: Callable[[], int]) -> int:
  """`train.num_steps` if > 0, else epochs over the train split (rounded up)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  n = num_train_examples()
  return max(1, math.ceil(config.train.num_epochs * n / config.train.batch_size))


def default_make_iterator(config, split, mesh, *, shuffle=True, num_epochs=None):
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.make_iterator(config, split, mesh, shuffle=shuffle, num_epochs=num_epochs)


def default_num_examples(config, split) -> int:
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.num_examples(config, split)


def prepare_data(config) -> list[str]:
  """Builds the config's dataset if it is not built yet (TFDS's bars on a terminal only);
  returns its split names."""
  from lvm import data  # pylint: disable=import-outside-toplevel
  from lvm.data import pipeline  # pylint: disable=import-outside-toplevel
  with console.tfds_progress(console.interactive()):
    data.prepare(config)
  return pipeline.splits(config)


def check_anyres_batch(model, batch):
  """Raises ValueError, before compiling, where an anyres batch's image-token runs do not
  match its `image_sizes` (`lvm.models.anyres_model.check_image_tokens`, on this process's
  rows; an injected iterator's mistake, which the data pipeline never makes)."""
  if model.anyres is None or 'image_sizes' not in batch:
    return
  from lvm.models import anyres_model  # pylint: disable=import-outside-toplevel
  for ids, sizes in zip(batch['input_ids'].addressable_shards,
                        batch['image_sizes'].addressable_shards):
    try:
      anyres_model.check_image_tokens(np.asarray(ids.data), np.asarray(sizes.data),
                                      model.image_token_id, model.anyres)
    except ValueError as e:
      rows = ids.index[0].indices(batch['input_ids'].shape[0])
      raise ValueError(f'First train batch, rows {rows[0]}..{rows[1] - 1}: {e}') from e


def train_loop(state, step: int, steps: int, train_iter, make_step, hooks):
  """Runs train steps `step + 1 .. steps` with `hooks` around each (see `lvm.hooks`).

  Args:
    state: the train state at `step`.
    step: the number of steps already done.
    steps: the last step.
    train_iter: an iterator of global batches.
    make_step: `example_batch -> lvm.step.JittedStep`, called on the first batch.
    hooks: `lvm.hooks.Hook`s, called in order.

  Returns:
    (state, step): where the loop stopped (`steps`, or earlier on preemption).
  """
  train_step = None
  previous = None  # the metrics of the step before, on the device
  try:
    while step < steps:
      for h in hooks:
        h.before_step(step, state)
      batch = next(train_iter)
      train_step = train_step or make_step(batch)
      state, metrics = train_step(state, batch)
      step += 1
      # Stay at most one step ahead of the device, so that a SIGTERM is acted on within
      # a step or two rather than after every queued step has run.
      if previous is not None:
        jax.block_until_ready(previous['unscored_tokens'])
      for h in hooks:
        h.dispatched(step, metrics, previous)
      previous = metrics
      if any(h.due(step) for h in hooks):
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for h in hooks:
          h(step, state, host)
  except hooks_lib.StopTraining:
    pass
  return state, step


def train_and_evaluate(config, workdir, *, make_iterator=None, num_examples=None) -> dict:
  """Trains and evaluates as `config` says; resumes from `workdir`'s latest checkpoint.

  Args:
    config: the full run config (the `lvm.config` tree).
    workdir: output folder (config.json, metrics.jsonl, tensorboard/, checkpoints/); a
      local path or any `etils.epath` path (e.g. `gs://bucket/run`).
    make_iterator: `(config, split, mesh, *, shuffle, num_epochs) -> iterator` of global
      batches with get_state/set_state; default `lvm.data.pipeline.make_iterator`.
    num_examples: `(config, split) -> int`; default `lvm.data.pipeline.num_examples`.

  Returns:
    The last evaluation records by split ('train' holds the last train metrics).

  Raises:
    lvm.hooks.NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  with console.quiet_libraries():
    return _train_and_evaluate(config, epath.Path(workdir), make_iterator, num_examples)


def _train_and_evaluate(config, workdir, make_iterator, num_examples) -> dict:
  start_time = time.time()
  validate.validate_config(config, jax.device_count(), jax.process_count())
  # An injected iterator's splits are unknown: its eval/test splits are taken as named.
  available = prepare_data(config) if make_iterator is None else None
  make_iterator = make_iterator or default_make_iterator
  num_examples = num_examples or default_num_examples

  # The model, its sharded state and the optimizer.
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config)
  steps = total_steps(config, lambda: num_examples(config, config.data.train_split))
  tx, lr_schedule = optim.make(config.optimizer, steps)
  factory = state_lib.StateFactory(config, model, tx, mesh, sharding.rules(config))
  # Only now, with the config, the data and the trainable pattern checked (the factory's
  # abstract init), does the run write anything: a config error leaves the workdir empty.
  writer = metrics_lib.MetricWriter(workdir, start_time)
  writer.write_config(config)
  # Absent eval/test splits are known (skipped, or an error) before anything is compiled.
  eval_splits = hooks_lib.eval_splits(config, available, writer.log)
  checkpointer = ckpt_lib.Checkpointer(str(workdir), config.checkpoint)

  # Resume from the newest whole checkpoint (a corrupt or partial newest one is reported
  # and set aside), else start as config.init says.
  train_iter = make_iterator(config, config.data.train_split, mesh, shuffle=True,
                             num_epochs=None)
  restored = checkpointer.restore_latest(factory.checkpoint_abstract, writer.log)
  if restored is not None:
    latest, state, data_state = restored
    state = factory.from_checkpoint(state, writer.log)  # LoRA: the base from config.init
    if data_state:
      train_iter.set_state(data_state)
    writer.log(f'Resumed from {checkpointer.directory}/{latest}')
  else:
    state = factory.from_params(state_lib.initial_params(config, factory, writer.log))
  step = int(jax.device_get(state['step']))

  # The periodic work between steps, in the order it runs.
  checkpoint = hooks_lib.Checkpoint(checkpointer, train_iter, config, steps, writer,
                                    factory.to_checkpoint)
  progress = hooks_lib.ReportProgress(writer, config, steps, step, lr_schedule)
  evaluator = hooks_lib.Evaluate(config, writer, step_lib.jit_eval_step(factory),
                                 make_iterator, steps, progress, eval_splits)
  benchmarks = hooks_lib.Benchmarks(config, writer, mesh, steps, progress, workdir)
  preemption = hooks_lib.Preemption(checkpoint, writer.log)
  hooks = [
      preemption,
      hooks_lib.UnscoredCheck(int(config.train.max_scored_tokens)),
      hooks_lib.Profile(config.train.profile_steps, str(workdir / 'profile')),
      hooks_lib.NanStop(checkpointer, config.train.log_every),
      hooks_lib.SkippedReport(train_iter, writer.log),
      progress,
      checkpoint,
      evaluator,
      benchmarks,
  ]
  options = step_lib.step_options(config.train)

  def make_step(batch):
    check_anyres_batch(model, batch)  # a wrong token count fails here, before compiling
    return step_lib.jit_train_step(factory, batch, **options)

  try:
    with preemption:
      state, step = train_loop(state, step, steps, train_iter, make_step, hooks)
    if step >= steps:  # else preempted: the next run resumes, then evaluates
      evaluator.run(step, state['params'])
      benchmarks.run(step, state['params'])
  finally:
    for h in hooks:
      h.close()
    checkpointer.close()
    writer.close()
  return {**({'train': progress.last} if progress.last else {}), **evaluator.results,
          **benchmarks.results}
