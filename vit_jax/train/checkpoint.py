"""Orbax checkpoints of a training run and exact resume (`vit_jax.restore`, in vit_jax.predict, reads them).

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`:

  state   the TrainState (params, optimiser state, BatchNorm stats, step, RNG), saved
          asynchronously, each array written by the processes that hold it
  data    the position of every process's input iterator (JSON, one entry per process)
  config  the run's config (JSON); a resume checks it against the new config

Restoring always passes explicit target shardings, so a checkpoint written on
8 devices with FSDP restores onto 1 device and the other way round.  A latest
checkpoint that cannot be read (half-written, corrupt) is moved aside to
`WORKDIR/checkpoints_corrupt/` with a warning and the previous one is used.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from vit_jax.train import config_base, multihost

ITEMS = ("state", "data", "config")

# Config keys that may change between a run and its resume (they do not change
# what was trained, only how it runs).
RESUMABLE_CHANGES = ("mesh", "data_dir", "checkpoint_every", "eval_every", "log_every", "progress_secs",
                     "keep_checkpoints", "eval_batch_size", "num_predictions")


class ConfigMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model or config."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def config_to_json(config) -> dict:
  """A JSON round trip of the config (tuples become lists), the form it is saved in."""
  return json.loads(config.to_json() if hasattr(config, "to_json") else json.dumps(config))


def config_differences(saved: dict, current: dict, prefix: str = "",
                       ignore: tuple[str, ...] = RESUMABLE_CHANGES, defaults: dict | None = None) -> list[str]:
  """Human-readable list of keys whose value differs between two config dicts.

  A key the saved config lacks counts as its base-config default (a checkpoint written before the key
  existed resumes as long as the run keeps that default).
  """
  if defaults is None:
    defaults = config_to_json(config_base.base_config())
  out = []
  for key in sorted(set(saved) | set(current)):
    name = f"{prefix}{key}"
    if name in ignore:
      continue
    a, b = saved.get(key, defaults.get(key, "<absent>")), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, name + ".", ignore, defaults.get(key, {}) if isinstance(
          defaults.get(key), dict) else {})
    elif a != b:
      out.append(f"{name}: checkpoint {a!r}, now {b!r}")
  return out


class Checkpointer:
  """Saves and restores training runs in `WORKDIR/checkpoints` (an `ocp.CheckpointManager`)."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # --------------------------------------------------------------------------- saving

  def save(self, step: int, state, data_state: Any, config, *, force: bool = True) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; `data_state` is this process's iterator position."""
    data_states = multihost.allgather_json(data_state)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({"process_count": len(data_states), "iterators": data_states}),
        config=ocp.args.JsonSave(config_to_json(config)))
    return self.manager.save(step, args=args, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  # --------------------------------------------------------------------------- restoring

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def restore(self, abstract_state, config, step: int | None = None):
    """(state, this process's data-iterator state or None, step) of the newest readable checkpoint.

    `abstract_state` carries the target shardings (jax.ShapeDtypeStruct leaves).
    Returns None when there is no checkpoint.  A checkpoint that cannot be read
    is moved aside with a warning and the previous one is tried, so nothing
    else is lost; a checkpoint of another config raises ConfigMismatchError.
    """
    steps = self.steps() if step is None else [step]
    for candidate in reversed(steps):
      try:
        saved_config = self.saved_config(candidate)
      except Exception as e:  # unreadable config: this checkpoint is broken
        self._set_aside(candidate, e)
        continue
      diffs = config_differences(saved_config, config_to_json(config))
      if diffs:
        raise ConfigMismatchError(
            f"The checkpoint at step {candidate} in {self.directory} was written by a different run:\n  "
            + "\n  ".join(diffs) + "\nUse a new --workdir, or pass the original values to resume.")
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore()))
      except Exception as e:
        if step is not None:
          raise
        self._set_aside(candidate, e)
        continue
      data = restored.data or {}
      iterators = data.get("iterators", [])
      if len(iterators) == jax.process_count():
        data_state = iterators[jax.process_index()]
      else:
        logging.warning("checkpoint %d was written by %d processes, this run has %d: the input pipeline "
                        "restarts from its beginning.", candidate, len(iterators), jax.process_count())
        data_state = None
      return restored.state, data_state, candidate
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    where = os.path.join(self.workdir, "checkpoints_corrupt", str(step))
    logging.warning("Checkpoint %d in %s cannot be read (%s: %s); moving it to %s and using the previous one.",
                    step, self.directory, type(error).__name__, str(error).splitlines()[0] if str(error) else "",
                    where)
    print(f"WARNING: checkpoint {step} is unreadable ({type(error).__name__}); moved to {where}, "
          "falling back to the previous checkpoint.", flush=True)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(where), exist_ok=True)
      if os.path.exists(where):
        shutil.rmtree(where)
      shutil.move(os.path.join(self.directory, str(step)), where)
    multihost.sync(f"set_aside_{step}")
    self.manager.reload()

