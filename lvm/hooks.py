"""The training loop's periodic work, as small hooks (flax lm1b's `periodic_actions`).

The loop (`lvm.train.train_loop`) calls, around each train step:

  hook.before_step(step, state)         before the step after `step` is dispatched;
  hook.dispatched(step, metrics, prev)  once step `step` is queued (`metrics` on the device,
                                        not waited for; `prev`, the previous step's, ready);
  hook(step, state, metrics)            at every step where some hook is `due(step)`: the
                                        metrics fetched to the host once, every hook in order.

A guard (`NanStop`, `UnscoredCheck`) checks every fetch; a periodic hook acts only when it
is due. A hook may add entries to `metrics` for the hooks after it; `StopTraining` ends
the loop early (preemption).
"""

import contextlib
import math
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm import config as config_lib
from lvm import console
from lvm import flops as flops_lib


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf."""


class StopTraining(Exception):
  """Raised by a hook to end the loop after the current step (state already saved)."""


def every(n: int, step: int, last: int | None = None) -> bool:
  """Whether `step` is a multiple of `n` (> 0) or the `last` step."""
  return (n > 0 and step % n == 0) or step == last


class Hook:
  """Does nothing; subclasses override what they need."""

  def before_step(self, step: int, state) -> None:
    pass

  def dispatched(self, step: int, metrics, previous) -> None:
    pass

  def due(self, step: int) -> bool:
    return False

  def __call__(self, step: int, state, metrics: dict[str, float]) -> None:
    pass

  def close(self) -> None:
    pass


class Checkpoint(Hook):
  """Saves the state and the data iterator's position every `checkpoint.interval` steps."""

  def __init__(self, checkpointer, train_iter, config, steps: int, writer=None,
               to_checkpoint=None):
    """`to_checkpoint`: state -> what is saved of it (default all; LoRA: the trainable
    parameters, `lvm.state.StateFactory.to_checkpoint`)."""
    self.checkpointer, self.train_iter, self.config = checkpointer, train_iter, config
    self.steps, self.writer = steps, writer
    self.to_checkpoint = to_checkpoint or (lambda state: state)

  def save(self, step: int, state) -> None:
    self.checkpointer.save(step, self.to_checkpoint(state), self.train_iter.get_state(),
                           self.config)
    if self.writer is not None:
      self.writer.flush()  # metrics up to a checkpoint survive a kill on any file system

  def due(self, step):
    return self.checkpointer.should_save(step) or step == self.steps

  def __call__(self, step, state, metrics):
    if self.due(step):
      self.save(step, state)


class Preemption(Hook):
  """On SIGTERM (on any process), saves a checkpoint before the next step and stops.

  Use it as a context manager: the handler is installed only within the `with` block.
  """

  def __init__(self, checkpoint: Checkpoint, log):
    self.checkpoint, self.log = checkpoint, log
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

  def before_step(self, step, state):
    if self.agreed():
      self.log(f'SIGTERM: saving a checkpoint at step {step} and exiting.')
      self.checkpoint.save(step, state)
      self.checkpoint.checkpointer.wait()
      raise StopTraining()


class UnscoredCheck(Hook):
  """Stops the run when `train.max_scored_tokens` left supervised targets out of the loss."""

  def __init__(self, scored_tokens: int):
    self.scored_tokens = scored_tokens

  def check(self, unscored: float, step: int) -> None:
    if unscored:
      raise ValueError(
          f'train.max_scored_tokens={self.scored_tokens} is below the supervised-token count '
          f'of a row: {unscored:.0f} targets went unscored at step {step}. Raise it to the '
          "longest row's count of supervised tokens, or set 0 to score every position.")

  def dispatched(self, step, metrics, previous):
    if self.scored_tokens and previous is not None:  # ready: a scalar read, no extra wait
      self.check(float(previous['unscored_tokens']), step - 1)

  def __call__(self, step, state, metrics):
    self.check(metrics['unscored_tokens'], step)


class Profile(Hook):
  """A `jax.profiler` trace of steps `profile_steps[0]..profile_steps[-1]` (process 0)."""

  def __init__(self, profile_steps, trace_dir: str):
    self.steps = tuple(profile_steps or ())
    self.trace_dir = trace_dir
    self.enabled = bool(self.steps) and jax.process_index() == 0

  def before_step(self, step, state):
    if self.enabled and step == self.steps[0]:
      jax.profiler.start_trace(self.trace_dir)

  def dispatched(self, step, metrics, previous):
    if self.enabled and step == self.steps[-1] + 1:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()


class NanStop(Hook):
  """Raises `NonFiniteLossError` when a fetched loss is NaN or Inf (nothing saved after)."""

  def __init__(self, checkpointer, log_every: int):
    self.checkpointer, self.log_every = checkpointer, log_every

  def __call__(self, step, state, metrics):
    if math.isfinite(metrics['loss']) and math.isfinite(metrics['total_loss']):
      return
    raise NonFiniteLossError(
        f'Loss is {metrics["loss"]} at step {step} (logged between steps '
        f'{step - self.log_every + 1} and {step}); stopping. Parameters after this step are '
        f'not saved; the last good checkpoint is step {self.checkpointer.latest_step()} in '
        f'{self.checkpointer.directory}. Lower config.optimizer.lr, check '
        'config.optimizer.clip_norm, or inspect the data.')


class SkippedReport(Hook):
  """Samples the input pipeline skipped so far (this process's rows), by reason; with a
  mixture, the samples taken from and dropped of each source, and the taken fractions
  (`mixture_NAME_samples`, `_fraction`, `_dropped`; this process's rows); and, where
  the pipeline buckets its batches (anyres tiles), the batch shapes so far, each of which
  compiles the train step once (`batch_shapes` in the metrics)."""

  def __init__(self, train_iter, log):
    self.train_iter, self.log = train_iter, log
    self.last = {}
    self.shapes = 0

  def __call__(self, step, state, metrics):
    skipped = dict(getattr(self.train_iter, 'stats', None) or {})
    metrics.update({f'skipped_{reason}': count for reason, count in skipped.items()})
    if skipped != self.last:
      self.log(f'data: samples skipped so far, by reason: {skipped}')
      self.last = skipped
    taken = getattr(self.train_iter, 'mixture_counts', None) or {}
    total = sum(taken.values())
    dropped = getattr(self.train_iter, 'mixture_drops', None) or {}
    for name, count in taken.items():
      metrics[f'mixture_{name}_samples'] = count
      metrics[f'mixture_{name}_fraction'] = count / total if total else 0.0
      metrics[f'mixture_{name}_dropped'] = dropped.get(name, 0)
    shapes = getattr(self.train_iter, 'batch_shapes', None)
    if shapes:
      metrics['batch_shapes'] = len(shapes)
      if len(shapes) != self.shapes:
        self.log(f'data: {len(shapes)} batch image shape(s) so far, each compiled once: '
                 f'{[list(s) for s in shapes]}')
        self.shapes = len(shapes)


# `flops.real_counts` in a train step's metrics; real_tokens first (whether they are there).
REAL_COUNTS = ('real_tokens', 'attended_pairs', 'unscored_real', 'real_images')


class ReportProgress(Hook):
  """Throughput and MFU on every fetch; every `log_every` steps a metrics record and a line.

  The line is `step N/M loss ... lr ... grad_norm ...` in logs; on a terminal a progress
  bar (rate, ETA) shows the loss instead. The first step (compilation) is never timed,
  nor the time spent inside `excluded()` (evaluation).

  `tokens_per_sec` and `mfu` count every position of the batch; `real_tokens_per_sec` and
  `mfu_real_tokens` only the real ones (`flops.real_step_flops`: no padding, attention within
  each packed sample, the tower on the slots holding an image or tile), from the counts of
  every step of the window (each read once its step has run, so the loop never waits for
  them).
  """

  def __init__(self, writer, config, steps: int, first_step: int, lr_schedule):
    self.writer, self.steps, self.first_step = writer, steps, first_step
    self.log_every = max(config.train.log_every, 1)
    self.batch_size = config.train.batch_size
    self.tokens_per_batch = config.train.batch_size * config.data.seq_len
    self.lr_schedule = lr_schedule
    self.peak = flops_lib.peak_tflops(jax.devices()[0])
    self.step_flops = flops_lib.train_step_flops(config) if self.peak else None
    self.real_flops = flops_lib.real_step_flops_fn(config) if self.step_flops else None
    self.window = None  # (time, step) of the last fetched metrics
    self.real, self.real_steps = {}, 0  # the window's summed `flops.real_counts`, its steps
    self.last = None  # the last written record
    self.bar = console.bar(steps, first_step, desc='train', unit='step') if (
        writer.enabled) else None

  def due(self, step):
    return every(self.log_every, step, self.steps)

  def dispatched(self, step, metrics, previous):
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
    if (previous is not None and self.window is not None and step - 1 > self.window[1]
        and REAL_COUNTS[0] in previous):  # `previous` has run: reading it does not wait
      self._add_real(jax.device_get({k: previous[k] for k in REAL_COUNTS}))

  def _add_real(self, counts):
    for k in REAL_COUNTS:
      self.real[k] = self.real.get(k, 0.0) + float(counts[k])
    self.real_steps += 1

  def _new_window(self, now, step):
    self.window = (now, step)
    self.real, self.real_steps = {}, 0

  @contextlib.contextmanager
  def excluded(self, step: int):
    """Time spent in the block does not count as training time."""
    try:
      yield
    finally:
      self._new_window(time.time(), step)

  def __call__(self, step, state, metrics):
    now = time.time()
    counted = REAL_COUNTS[0] in metrics
    if counted and self.window is not None and step > self.window[1]:
      self._add_real(metrics)
    if self.window is not None and step - self.first_step > 1:
      steps = step - self.window[1]
      dt = (now - self.window[0]) / steps
      metrics['samples_per_sec'] = self.batch_size / dt
      metrics['tokens_per_sec'] = self.tokens_per_batch / dt
      metrics['step_time'] = dt
      if self.step_flops:
        metrics['mfu'] = flops_lib.mfu(self.step_flops, dt, jax.device_count(), self.peak)
      if counted and self.real_steps == steps:
        mean = {k: v / steps for k, v in self.real.items()}
        metrics['real_tokens_per_sec'] = mean['real_tokens'] / dt
        if self.real_flops:
          real = self.real_flops(**mean)
          metrics['mfu_real_tokens'] = flops_lib.mfu(real, dt, jax.device_count(), self.peak)
    for k in REAL_COUNTS[1:]:  # inputs of the above, not worth a record of their own
      metrics.pop(k, None)
    self._new_window(now, step)
    metrics['lr'] = float(self.lr_schedule(step - 1))
    if not self.due(step):
      return
    self.last = self.writer.write(step, 'train', metrics)
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{metrics["loss"]:.4f}', refresh=False)
    else:
      self.writer.log(f'step {step}/{self.steps} loss {metrics["loss"]:.4f} '
                      f'lr {metrics["lr"]:.3g} grad_norm {metrics["grad_norm"]:.3g}')

  def close(self):
    if self.bar is not None:
      self.bar.close()


def evaluate(config, params, split: str, eval_step, make_iterator) -> dict[str, float]:
  """Loss, token accuracy and answer exact match over `split` (teacher-forced).

  `exact_match` is per answer (see `lvm.losses.eval_sums`); `example_exact_match` per
  conversation.
  """
  iterator = make_iterator(config, split, eval_step.mesh, shuffle=False, num_epochs=1)
  limit = config.train.eval_batches
  sums = None
  for i, batch in enumerate(console.progress(iterator, total=limit if limit >= 0 else None,
                                             desc=f'eval {split}', unit='batch')):
    if 0 <= limit <= i:
      break
    out = eval_step(params, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError(f'The {split!r} split gave no batches to evaluate.')
  s = {k: float(v) for k, v in jax.device_get(sums).items()}
  tokens, answers = max(s['tokens'], 1.0), max(s['answers'], 1.0)
  return {'loss': s['nll_sum'] / tokens, 'token_accuracy': s['correct_tokens'] / tokens,
          'exact_match': s['exact_answers'] / answers,
          'example_exact_match': s['exact_examples'] / max(s['examples'], 1.0),
          'num_answers': int(s['answers']), 'num_examples': int(s['examples'])}


def eval_splits(config, available, log) -> dict[str, str]:
  """What the run evaluates: {'eval': data.eval_split, 'test': data.test_split}, checked
  against the dataset's splits before anything is compiled.

  '' turns a split off. A name left at its schema default ('validation', 'test') is
  optional: when the dataset has no such split, one line says so and it is skipped (a small
  `llava_json` set may have no validation sample, and has a test split only from its
  `test_files`). Any other name was asked for, and must exist.

  Args:
    config: the run config.
    available: the dataset's split names, or None to take the config's as they are (an
      injected iterator whose splits are unknown).
    log: prints a line.

  Returns:
    {'eval': name or '', 'test': name or ''}.

  Raises:
    ValueError: a split named explicitly that the dataset lacks.
  """
  defaults = config_lib.get_config().data
  out = {}
  for name, key in (('eval', 'eval_split'), ('test', 'test_split')):
    split = config.data[key]
    if split and available is not None and split not in available:
      have = ', '.join(available)
      if split != defaults[key]:
        raise ValueError(
            f'config.data.{key}={split!r} is not a split of dataset {config.data.dataset!r} '
            f'(it has: {have}). Fix: name one of those, or set config.data.{key}= (empty) to '
            f'evaluate no {name} split.')
      hint = (' (llava_json: config.data.llava_json.test_files names the test JSON files)'
              if name == 'test' else '')
      log(f'data: dataset {config.data.dataset!r} has no {split!r} split (it has: {have}), '
          f'so config.data.{key}={split!r} (the default) is skipped{hint}. Set '
          f'config.data.{key}= to silence this.')
      split = ''
    out[name] = split
  return out


class Evaluate(Hook):
  """Teacher-forced evaluation of the eval split every `train.eval_every` steps.

  `run(step, params)` after the loop scores the eval split and, at the last step, the
  test split (scored once, at the end). `splits` is `eval_splits(...)`: '' skips one.
  """

  def __init__(self, config, writer, eval_step, make_iterator, steps: int,
               progress: ReportProgress, splits: dict[str, str]):
    self.config, self.writer, self.eval_step = config, writer, eval_step
    self.make_iterator, self.steps, self.progress = make_iterator, steps, progress
    self.splits = splits
    self.results = {}  # the last record by split name

  def due(self, step):
    every_n = self.config.train.eval_every
    return (every_n > 0 and step % every_n == 0 and step < self.steps
            and bool(self.splits['eval']))

  def run(self, step: int, params) -> dict[str, dict]:
    for name in ('eval', 'test'):
      split = self.splits[name]
      if not split or (name == 'test' and step < self.steps):
        continue
      m = evaluate(self.config, params, split, self.eval_step, self.make_iterator)
      self.results[name] = self.writer.write(step, name, m)
      self.writer.log(f'step {step} {name} ({split}): loss {m["loss"]:.4f} exact_match '
                      f'{m["exact_match"]:.4f} ({m["num_answers"]} answers, teacher-forced)')
    return self.results

  def __call__(self, step, state, metrics):
    if self.due(step):
      with self.progress.excluded(step):
        self.run(step, state['params'])


class Benchmarks(Hook):
  """Generation-based benchmark scores (`train.eval_benchmarks`) every `train.eval_every`
  steps and at the end, through `lvm.evaluate.run` on the first
  `train.eval_benchmark_questions` questions of each.

  Generation runs on the training mesh (batches over its data axes, each process decoding
  its share of the images) from the current parameters, with the run's tokenizer and
  template. Each benchmark's headline score, how many questions were scored of how many,
  and the skipped and unparseable counts go to metrics.jsonl and TensorBoard as split
  'bench/NAME'; its answers and score.json to WORKDIR/eval/NAME_stepN. A benchmark that
  cannot run (its files went missing) is reported in the log and training goes on.
  """

  def __init__(self, config, writer, mesh, steps: int, progress: ReportProgress, workdir):
    from lvm import eval as benchmarks  # pylint: disable=g-import-not-at-top
    self.config, self.writer, self.mesh, self.steps = config, writer, mesh, steps
    self.progress, self.workdir = progress, workdir
    self.specs = [benchmarks.parse_spec(s) for s in config.train.eval_benchmarks]
    self.text_gen = None  # built at the first evaluation (compiled once, params swapped)
    self.results = {}  # the last record by split ('bench/NAME')

  def due(self, step):
    every_n = self.config.train.eval_every
    return every_n > 0 and step % every_n == 0 and step < self.steps and bool(self.specs)

  def _generator(self, params):
    from lvm import generate, inference  # pylint: disable=g-import-not-at-top
    from lvm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    if self.text_gen is None:
      gen = generate.Generator(self.config, params, mesh=self.mesh)
      self.text_gen = inference.TextGenerator(gen, tokenizer_lib.load(self.config),
                                              self.config.data.template,
                                              self.config.data.system_prompt)
    else:
      gen = self.text_gen.generator
      gen.params = jax.device_put(nn.unbox(params), gen.param_shardings)
    return self.text_gen

  def run(self, step: int, params) -> dict[str, dict]:
    from lvm import evaluate  # pylint: disable=g-import-not-at-top
    if not self.specs:
      return self.results
    text_gen = self._generator(params)
    train = self.config.train
    for name, split, data_dir in self.specs:
      try:
        r = evaluate.run(text_gen, self.config, name, data_dir,
                         str(self.workdir / 'eval' / f'{name}_step{step}'),
                         limit=train.eval_benchmark_questions,
                         batch_size=train.eval_benchmark_batch_size, split=split)
      except (FileNotFoundError, ValueError) as e:  # files gone or malformed since start
        self.writer.log(f'step {step} benchmark {name}: not scored: {e}')
        continue
      m = {**r['headline'], 'num_scored': r['num_scored'], 'num_questions': r['num_questions'],
           'num_skipped': sum(r['skipped'].values()), 'unparseable': r['unparseable'],
           'questions_per_second': r['questions_per_second']}
      self.results[f'bench/{name}'] = self.writer.write(step, f'bench/{name}', m)
      self.writer.log(f'step {step} benchmark {evaluate.summary(r).splitlines()[0]}')
    text_gen.generator.params = None  # no second copy of the weights between evaluations
    return self.results

  def __call__(self, step, state, metrics):
    if self.due(step):
      with self.progress.excluded(step):
        self.run(step, state['params'])
