"""Orbax checkpoints under `workdir/checkpoints/`, and `load_params` for later runs.

Each step directory holds three items: `state` (the train state pytree, whose
`params` subtree is the model's parameters), `data` (the data iterator's JSON state)
and `config` (the run's resolved config as JSON). Restoring against an abstract
state whose leaves carry shardings puts the arrays straight onto any mesh, so a
checkpoint written on one mesh restores onto another.

Paths are `etils.epath` paths, so a workdir may be anywhere orbax writes (a local
folder or `gs://bucket/run`); URIs are used as written, never made local.
"""

import json
import os
import socket
import sys
from typing import Any, Callable

from etils import epath
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')
# Written by orbax into a step folder when its save has finished.
COMMIT_MARKER = 'commit_success.txt'


# A converted or params-only step folder (`save_params`) has no data iterator state.
PARAMS_ITEMS = ('state', 'config')
PathLike = str | epath.Path


def as_path(path: PathLike) -> epath.Path:
  """An epath.Path; a local path is made absolute, a URI (`gs://...`) is kept as written."""
  if '://' in str(path):
    return epath.Path(path)
  return epath.Path(path).expanduser().absolute()


def checkpoint_dir(workdir: PathLike) -> epath.Path:
  return as_path(workdir) / 'checkpoints'


def check_writable(workdir: PathLike) -> epath.Path:
  """Creates `workdir` and writes a probe file there, before anything is compiled.

  Raises:
    ValueError: naming the workdir and why it cannot be written (no such bucket, no
      credentials, no file system registered for its scheme, a file in the way).
  """
  path = as_path(workdir)
  # One probe per process: the processes of a multi-host run check the same folder at once.
  probe = path / f'.lvm_write_probe.{socket.gethostname()}.{os.getpid()}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink(missing_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    detail = ' '.join(str(e).split())[:300] or type(e).__name__
    raise ValueError(f'--workdir={workdir}: cannot write there ({type(e).__name__}: {detail}). '
                     'Give a folder (local, or a bucket URI such as gs://bucket/run) that '
                     'this process can create and write.') from e
  return path


def step_problems(step_dir: epath.Path, items=ITEMS, others_committed: bool = False) -> str | None:
  """Why the checkpoint in `step_dir` is incomplete, or None if its files look whole.

  A step folder needs every item and, where this orbax writes commit markers (the run's
  other steps have `commit_success.txt`: `others_committed`), its own marker.
  """
  missing = [item for item in items if not (step_dir / item).is_dir()]
  if missing:
    return f'item folder(s) {missing} missing'
  if others_committed and not (step_dir / COMMIT_MARKER).exists():
    return f'commit marker {COMMIT_MARKER} missing (the save never finished)'
  return None


def _is_abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is a leftover of a restore that orbax gave up on."""
  if unraisable.object is None:  # a TensorStore read finishing after the loop closed
    tb, names = unraisable.exc_traceback, []
    while tb is not None:
      names.append(tb.tb_frame.f_code.co_name)
      tb = tb.tb_next
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'
            and names == ['call_soon_threadsafe', '_check_closed'])
  code = getattr(unraisable.object, 'cr_code', None)  # a pending read garbage-collected
  return (code is not None and code.co_name == '_read_array_index_and_device_put'
          and f'{os.sep}orbax{os.sep}' in code.co_filename)


def quiet_abandoned_reads() -> None:
  """Keeps the leftovers of a failed restore off stderr; installed once per process.

  When orbax gives up on a checkpoint at one array (a damaged file, another shape), it
  closes its event loop with the other arrays' reads still pending. Each then prints an
  'Exception ignored' traceback of ~40 lines (dozens per checkpoint, from TensorStore's
  threads or when garbage-collected) that bury the one-line warning naming the bad step.
  Only those reports are dropped; every other one goes to the hook that was there before.
  """
  if getattr(sys.unraisablehook, 'lvm_quiet_abandoned_reads', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook.lvm_quiet_abandoned_reads = True
  sys.unraisablehook = hook


class Checkpointer:
  """A CheckpointManager with interval, keep-N and asynchronous saves.

  Args:
    workdir: the run's folder (str or epath.Path, local or a URI such as gs://bucket/run);
      checkpoints go to `workdir/checkpoints/<step>/`.
    ckpt_config: `config.checkpoint` (interval, keep, async_save).
  """

  def __init__(self, workdir: PathLike, ckpt_config):
    self.interval = int(ckpt_config.interval)
    options = ocp.CheckpointManagerOptions(
        # Interval saves are decided here (`should_save`), so orbax saves whatever it is given.
        save_interval_steps=1,
        max_to_keep=int(ckpt_config.keep) if ckpt_config.keep > 0 else None,
        enable_async_checkpointing=bool(ckpt_config.async_save),
        create=True)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.interval > 0 and step % self.interval == 0

  def save(self, step: int, state, data_state: dict, config) -> None:
    """Starts saving (asynchronously if configured); `wait` blocks until written."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Returns (state, data iterator state) of `step`, placed as `abstract_state` says.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
    """
    quiet_abandoned_reads()
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def problems(self, step: int) -> str | None:
    """Why the checkpoint of `step` is incomplete, or None (see `step_problems`)."""
    others = any((self.directory / str(s) / COMMIT_MARKER).exists()
                 for s in self.manager.all_steps() if s != step)
    return step_problems(self.directory / str(step), ITEMS, others)

  def restore_latest(self, abstract_state, log=print) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that is whole; None if there is none.

    A newest checkpoint that is incomplete or unreadable (a truncated or missing file,
    no commit marker) is reported and moved to `workdir/checkpoints_corrupt/`, never
    deleted, and the previous one is tried. If no checkpoint restores, nothing is moved
    (a config that no longer matches the checkpoints is an error, not corruption).

    Returns:
      (step, state, data iterator state) or None when there are no checkpoints.

    Raises:
      RuntimeError: checkpoints exist but none restores (each step's error is listed).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      problem = self.problems(step)
      if problem is None:
        try:
          state, data_state = self.restore(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          problem = f'{type(e).__name__}: {str(e)[:500]}'
        else:
          for bad, why in failed:
            where = self._quarantine(bad)
            log(f'WARNING: checkpoint step {bad} is unusable ({why}); moved it to {where} and '
                f'restored step {step} instead.')
          return step, state, data_state
      log(f'WARNING: checkpoint {self.directory}/{step} is unusable: {problem}')
      failed.append((step, problem))
    if failed:
      raise RuntimeError(
          f'No checkpoint in {self.directory} restores:\n' +
          '\n'.join(f'  step {s}: {why}' for s, why in failed) +
          '\nIf config.model or the mesh rules changed since they were written, restore '
          'the old config, or start a new workdir.')
    return None

  def _quarantine(self, step: int) -> epath.Path:
    """Moves a bad step folder out of the manager's sight (process 0), then syncs."""
    target = self.directory.parent / 'checkpoints_corrupt' / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      suffix, final = 0, target
      while final.exists():
        suffix += 1
        final = target.parent / f'{step}.{suffix}'
      (self.directory / str(step)).rename(final)
      target = final
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'lvm_checkpoint_quarantine_{step}')
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _step_dirs(path: PathLike) -> tuple[list[epath.Path], bool]:
  """Step folders to try, newest first, and whether `path` named one step folder itself."""
  path = as_path(path)
  if (path / 'state').is_dir():
    return [path], True
  for root in (path / 'checkpoints', path):
    if root.is_dir():
      steps = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit()), reverse=True)
      if steps:
        return [root / str(s) for s in steps], False
  raise FileNotFoundError(
      f'No checkpoint under {str(path)!r}: expected a run workdir (with checkpoints/<step>/state),'
      ' a checkpoints folder, or a checkpoint step folder.')


def _read_config(step_dir: epath.Path) -> ml_collections.ConfigDict:
  from lvm import config as lvm_config  # pylint: disable=g-import-not-at-top
  saved = ml_collections.ConfigDict(json.loads((step_dir / 'config' / 'metadata').read_text()))
  return lvm_config.upgrade(saved)  # in today's layout, whatever lvm version wrote it


def _restore_params(step_dir: epath.Path, abstract_params):
  checkpointer = ocp.PyTreeCheckpointer()
  state_dir = step_dir / 'state'
  if abstract_params is None:
    metadata = checkpointer.metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata.tree
    abstract_params = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.local_devices()[0])),
        tree['params'])
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  quiet_abandoned_reads()
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': abstract_params}, restore_args={'params': restore_args},
      partial_restore=True))
  # Leaves of the target that the checkpoint lacks come back abstract: leave them out (a
  # LoRA run started from a checkpoint written without adapters keeps its fresh ones).
  flat = traverse_util.flatten_dict(restored['params'], sep='/')
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not isinstance(v, jax.ShapeDtypeStruct)}, sep='/')


def _first_whole(path: PathLike, read: Callable[[epath.Path], Any], log) -> Any:
  """`read(step_dir)` of the newest step folder under `path` that reads whole.

  As training's `Checkpointer.restore_latest`: a newest checkpoint that is incomplete or
  unreadable is reported and the previous one tried; nothing is moved (inference only
  reads). A step folder named explicitly is not replaced by another: its failure is an
  error naming it and the steps beside it.

  Raises:
    RuntimeError: no step folder reads (each one's error listed).
  """
  step_dirs, explicit = _step_dirs(path)
  committed = {d.name for d in step_dirs if (d / COMMIT_MARKER).exists()}
  failed = []
  for step_dir in step_dirs:
    problem = step_problems(step_dir, PARAMS_ITEMS, bool(committed - {step_dir.name}))
    if problem is None:
      try:
        result = read(step_dir)
      except Exception as e:  # pylint: disable=broad-except
        problem = f'{type(e).__name__}: {" ".join(str(e).split())[:500]}'
      else:
        for bad, why in failed:
          log(f'WARNING: checkpoint step {bad} is unusable ({why}); using step '
              f'{step_dir.name} of {step_dir.parent} instead.')
        return result
    failed.append((step_dir.name, problem))
  if explicit:
    parent = step_dirs[0].parent
    others = sorted(int(d.name) for d in parent.iterdir() if d.name.isdigit()
                    and d != step_dirs[0] and (d / 'state').is_dir()) if parent.is_dir() else []
    raise RuntimeError(
        f'Checkpoint {step_dirs[0]} does not restore: {failed[0][1]}\n'
        + (f'Other checkpoint steps in {parent}: {others} (give one of them, or the workdir '
           'for the newest that restores).' if others else 'No other checkpoint steps beside it.'))
  raise RuntimeError(f'No checkpoint under {path} restores:\n' +
                     '\n'.join(f'  step {s}: {why}' for s, why in failed))


def load_config(path: PathLike, log=print) -> ml_collections.ConfigDict:
  """The config saved with the newest readable checkpoint at `path` (see `load_params`)."""
  return _first_whole(path, _read_config, log)


def load_params(path: PathLike, abstract_params=None,
                log=print) -> tuple[ml_collections.ConfigDict, Any]:
  """Loads the model parameters of an earlier run, from its newest checkpoint that restores.

  A corrupt or incomplete newest checkpoint is reported through `log` and the previous
  one used (as training's resume does); an explicitly named step folder that does not
  restore is an error naming it and its neighbours.

  Args:
    path: a run's workdir (local or URI), its `checkpoints/` folder, one checkpoint step
      folder, or a `save_params` folder.
    abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings to restore onto
      (each host reads only its shards), or a function of the run's config returning
      one; None: the saved shapes as arrays on the first local device (tests, tools).
    log: where warnings about skipped checkpoints go.

  Returns:
    (config of that run, params pytree).
  """
  def read(step_dir):
    config = _read_config(step_dir)
    target = abstract_params(config) if callable(abstract_params) else abstract_params
    from lvm import lora  # pylint: disable=g-import-not-at-top
    if lora.saves_base(config):
      return config, _restore_params(step_dir, target)
    # A LoRA run saved only its trainable parameters: read those, rebuild the base.
    from lvm import optim  # pylint: disable=g-import-not-at-top
    saved_target = None if target is None else optim.split(target,
                                                            lora.trainable_regex(config))[0]
    saved = _restore_params(step_dir, saved_target)
    return config, lora.complete_params(config, saved, target, log)
  return _first_whole(path, read, log)


def save_params(step_dir: PathLike, config: ml_collections.ConfigDict, params) -> epath.Path:
  """Writes `params` and the full `config` as a step folder `load_params` reads.

  The items are a training step's `state` (here only `{'params': ...}`) and `config`, so
  generation, evaluation, export and `config.init.kind='checkpoint'` read it as they read
  a training checkpoint. An existing folder is replaced.
  """
  step_dir = as_path(step_dir)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(step_dir, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))), force=True)
  return step_dir
