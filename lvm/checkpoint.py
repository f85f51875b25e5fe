"""Orbax checkpoints under `workdir/checkpoints/`, and `load_params` for later runs.

Each step directory holds three items: `state` (the train state pytree, whose
`params` subtree is the model's parameters), `data` (the data iterator's JSON state)
and `config` (the run's resolved config as JSON). Restoring against an abstract
state whose leaves carry shardings puts the arrays straight onto any mesh, so a
checkpoint written on one mesh restores onto another.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')
# Written by orbax into a step folder when its save has finished.
COMMIT_MARKER = 'commit_success.txt'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """A CheckpointManager with interval, keep-N and asynchronous saves.

  Args:
    workdir: the run's folder; checkpoints go to `workdir/checkpoints/<step>/`.
    ckpt_config: `config.checkpoint` (interval, keep, async_save).
  """

  def __init__(self, workdir: str, ckpt_config):
    self.interval = int(ckpt_config.interval)
    options = ocp.CheckpointManagerOptions(
        # Interval saves are decided here (`should_save`), so orbax saves whatever it is given.
        save_interval_steps=1,
        max_to_keep=int(ckpt_config.keep) if ckpt_config.keep > 0 else None,
        enable_async_checkpointing=bool(ckpt_config.async_save),
        create=True)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
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
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def problems(self, step: int) -> str | None:
    """Why the checkpoint of `step` is incomplete, or None if its files look whole.

    A step folder needs every item and, where this orbax writes commit markers
    (`commit_success.txt`, present in the run's other steps), its own marker.
    """
    step_dir = os.path.join(self.directory, str(step))
    missing = [item for item in ITEMS if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
      return f'item folder(s) {missing} missing'
    if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
      others = [s for s in self.manager.all_steps() if s != step and os.path.exists(
          os.path.join(self.directory, str(s), COMMIT_MARKER))]
      if others:
        return f'commit marker {COMMIT_MARKER} missing (the save never finished)'
    return None

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

  def _quarantine(self, step: int) -> str:
    """Moves a bad step folder out of the manager's sight (process 0), then syncs."""
    target = os.path.join(os.path.dirname(self.directory), 'checkpoints_corrupt', str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      suffix, final = 0, target
      while os.path.exists(final):
        suffix += 1
        final = f'{target}.{suffix}'
      os.rename(os.path.join(self.directory, str(step)), final)
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


def _resolve_step_dir(path: str) -> str:
  """A checkpoint step folder from a workdir, its checkpoints folder, or a step folder."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  for root in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(root):
      steps = [int(d) for d in os.listdir(root) if d.isdigit()
               and os.path.isdir(os.path.join(root, d, 'state'))]
      if steps:
        return os.path.join(root, str(max(steps)))
  raise FileNotFoundError(
      f'No checkpoint under {path!r}: expected a run workdir (with checkpoints/<step>/state), '
      'a checkpoints folder, or a checkpoint step folder.')


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint at `path` (see `load_params`)."""
  step_dir = _resolve_step_dir(path)
  with open(os.path.join(step_dir, 'config', 'metadata')) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(path: str, abstract_params=None) -> tuple[ml_collections.ConfigDict, Any]:
  """Loads the model parameters of an earlier run.

  Args:
    path: a run's workdir (its latest checkpoint is used), its `checkpoints/` folder,
      or one checkpoint step folder.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to
      restore onto; default: the saved shapes, as host-local arrays.

  Returns:
    (config of that run, params pytree).
  """
  step_dir = _resolve_step_dir(path)
  config = load_config(step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  state_dir = os.path.join(step_dir, 'state')
  if abstract_params is None:
    metadata = checkpointer.metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata.tree
    abstract_params = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.local_devices()[0])),
        tree['params'])
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': abstract_params}, restore_args={'params': restore_args},
      partial_restore=True))
  return config, restored['params']
