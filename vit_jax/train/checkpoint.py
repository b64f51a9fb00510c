"""Orbax checkpoints of a training run and exact resume (`vit_jax.restore`, in vit_jax.predict, reads them).

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`:

  state   the TrainState (params, optimiser state, BatchNorm stats, step, RNG), saved
          asynchronously, each array written by the processes that hold it
  data    the position of every process's input iterator (JSON, one entry per process) and a
          checksum of every array of `state` (position-weighted sum of its 32-bit words)
  config  the run's config (JSON); a resume checks it against the new config

Restoring always passes explicit target shardings, so a checkpoint written on
8 devices with FSDP restores onto 1 device and the other way round.

What happens to a checkpoint that cannot be restored:

  * provably incomplete or corrupt (no commit marker, metadata that is not JSON, a
    truncated, missing or undecodable array file, a checksum that does not match): moved
    aside to `WORKDIR/checkpoints_corrupt/<step>` with a warning, and the previous one is tried;
  * any other error (permission denied, an I/O error, a model whose shapes changed after
    a code edit, ...): `CheckpointRestoreError` naming the checkpoint and the cause;
    nothing is moved and no earlier checkpoint is used instead;
  * checkpoints exist (or were set aside) but none can be restored: the run does not
    silently start from step 0 (`NoRestorableCheckpointError`) unless
    `--config.restart_from_scratch=true` says so (the unrestorable ones are then moved to
    `WORKDIR/checkpoints_unrestorable/`; nothing is deleted).

A save that fails (no space left, permission denied, ...) raises `CheckpointWriteError`
naming the directory, the cause and the free space; the half-written step stays an Orbax
temporary folder (removed at the next start) and the previous checkpoint is untouched.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from vit_jax.train import config_base, multihost

ITEMS = ("state", "data", "config")

# Config keys that may change between a run and its resume (they do not change
# what was trained, only how it runs).
RESUMABLE_CHANGES = ("mesh", "data_dir", "checkpoint_every", "eval_every", "log_every", "progress_secs",
                     "keep_checkpoints", "eval_batch_size", "num_predictions", "fewshot", "fewshot_every",
                     "restart_from_scratch", "max_bad_fraction",
                     # config.pretrained only initialises a new run; a resume never reads it.  The memory
                     # budget of accum_steps="auto" is the machine's, as the mesh.
                     "pretrained", "memory_budget_gb",
                     # Where compiled programs are cached changes no result.
                     "compilation_cache_dir")
COMMIT_MARKER = "commit_success.txt"  # written by Orbax last, before the rename that publishes a step
CHECKSUM_KIND = "wsum32-v1"


class ConfigMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model or config."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint exists but cannot be restored for a reason other than provable corruption."""


class NoRestorableCheckpointError(CheckpointRestoreError):
  """Checkpoints exist (or were set aside as corrupt) but none can be restored."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint is provably incomplete or corrupt."""


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (no space left, permission denied, ...)."""


# ----------------------------------------------------------------------------- checksums

def _words(x):
  """The array as uint32 words (bool and 8/16-bit types widened, 64-bit types split in two)."""
  import jax.numpy as jnp
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of 2 words


def _checksum(x):
  """sum_i word_i * (2 i + 1) mod 2^32 over the row-major word index i: exact on any sharding
  (integer sums associate), and any single changed word changes it (odd factors)."""
  import jax.numpy as jnp
  words = _words(x)
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _key(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


_CHECKSUM_FNS: dict[Any, Any] = {}


def checksums(tree) -> dict[str, int]:
  """name -> checksum of every array of `tree` (names are '/'-joined paths: 'params/head/kernel').

  Every process must call it (the sums of sharded arrays are collectives)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    return {}
  shardings = [getattr(x, "sharding", None) for _, x in leaves]
  mesh = next((s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)), None)
  key = (treedef, tuple((x.shape, str(x.dtype)) for _, x in leaves), mesh)
  fn = _CHECKSUM_FNS.get(key)
  if fn is None:
    out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = _CHECKSUM_FNS[key] = jax.jit(lambda xs: [_checksum(x) for x in xs], out_shardings=out)
  values = fn([x for _, x in leaves])
  return {_key(path): int(v.addressable_data(0)) for (path, _), v in zip(leaves, values)}


def verify_checksums(tree, saved: dict[str, int] | None, where: str) -> None:
  """Raises CorruptCheckpointError when an array of `tree` differs from what was saved (`saved` None or
  empty: nothing recorded, e.g. a checkpoint of an older version).  Arrays `saved` lacks are not checked."""
  if not saved:
    return
  got = checksums(tree)
  bad = sorted(k for k, v in got.items() if k in saved and saved[k] != v)
  if bad:
    raise CorruptCheckpointError(f"{len(bad)} array(s) of {where} differ from what was written (checksum "
                                 f"mismatch: the files were changed or damaged after the save): {bad[:5]}")


# ----------------------------------------------------------------------------- what is corrupt

_CORRUPTION_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "Error decoding", "Truncated", "truncated", "checksum",
                       "Unexpected end", "corrupt")


def corruption(error: BaseException) -> str | None:
  """Why `error` (from restoring a checkpoint) proves the checkpoint incomplete or corrupt, else None.

  Unreadable metadata (not JSON), truncated, missing or undecodable array data and checksum
  mismatches are corruption; permission problems, other I/O errors and shape or structure mismatches
  (a model changed after a code edit) are not: they are fixed elsewhere and must not cost the checkpoint.
  """
  seen, chain = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
  if any(isinstance(e, PermissionError) for e in chain) or "PERMISSION_DENIED" in text:
    return None
  for e in chain:
    if isinstance(e, CorruptCheckpointError):
      return str(e)
    if isinstance(e, json.JSONDecodeError):
      return f"metadata that is not valid JSON ({e})"
    if isinstance(e, FileNotFoundError):
      return f"a file of the checkpoint is missing ({str(e).splitlines()[0][:300]})"
    if isinstance(e, (IsADirectoryError, NotADirectoryError)):
      return f"a directory where a file belongs, or the other way round ({str(e).splitlines()[0][:300]})"
  if "NOT_FOUND" in text:
    return "an array file of the checkpoint is missing"
  for marker in _CORRUPTION_MARKERS:
    if marker in text:
      line = next((str(e) for e in chain if marker in f"{type(e).__name__}: {e}"), text)
      line = next((l for l in line.splitlines() if marker in l), line.splitlines()[0] if line else "")
      return f"array data that cannot be read back ({line.strip()[:300]})"
  return None


def _first_line(error: BaseException) -> str:
  message = str(error).strip().splitlines()
  return f"{type(error).__name__}: {message[0][:400] if message else ''}"


def incomplete(step_dir: str) -> str | None:
  """Why the step folder is provably incomplete (no commit marker), else None.

  Orbax writes `commit_success.txt` last; a folder without it is unfinished when its siblings have one
  (this Orbax writes markers) or when `_CHECKPOINT_METADATA` holds no commit time either.
  """
  if os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
    return None
  parent = os.path.dirname(step_dir)
  try:
    siblings = [n for n in os.listdir(parent) if n.isdigit() and os.path.join(parent, n) != step_dir]
  except OSError:
    siblings = []
  if any(os.path.exists(os.path.join(parent, n, COMMIT_MARKER)) for n in siblings):
    return f"no commit marker ({COMMIT_MARKER}, which the other checkpoints have): the save never finished"
  try:
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
      if json.load(f).get("commit_timestamp_nsecs"):
        return None  # committed by an Orbax version that writes no marker file
  except FileNotFoundError:
    pass
  except (OSError, ValueError):
    return f"no {COMMIT_MARKER} and an unreadable _CHECKPOINT_METADATA"
  return f"no commit marker ({COMMIT_MARKER}, or a commit time in _CHECKPOINT_METADATA): the save never finished"


def check_complete(directory: str, step: int) -> None:
  """Raises CorruptCheckpointError when checkpoint `step` in `directory` is provably incomplete."""
  why = incomplete(os.path.join(directory, str(step)))
  if why:
    raise CorruptCheckpointError(why)


def unreadable(step: int, directory: str, error: BaseException) -> CheckpointRestoreError:
  """The one error for a checkpoint that cannot be read: which one, and why (corrupt or not)."""
  why = corruption(error)
  what = f"it is corrupt or incomplete: {why}" if why else _first_line(error)
  return CheckpointRestoreError(f"Checkpoint {step} in {directory} cannot be restored: {what}. Nothing was loaded.")


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
    self._saving = None  # the step of the newest save started (an asynchronous failure surfaces later)

  # --------------------------------------------------------------------------- saving

  def save(self, step: int, state, data_state: Any, config, *, force: bool = True) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; `data_state` is this process's iterator position.

    Raises CheckpointWriteError when this save, or the previous asynchronous one, failed.
    """
    data_states = multihost.allgather_json(data_state)
    sums = checksums(state)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({"process_count": len(data_states), "iterators": data_states,
                                "checksum_kind": CHECKSUM_KIND, "checksums": sums}),
        config=ocp.args.JsonSave(config_to_json(config)))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(e, self._saving if self._saving is not None else step)
    self._saving = step
    return saved

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError if an asynchronous save has failed (cheap: call it now and then)."""
    check = getattr(self.manager, "check_for_errors", None)
    if check is None or self._saving is None:
      return
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(e, self._saving)

  def wait(self) -> None:
    """Waits for the asynchronous save (CheckpointWriteError when it failed)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._write_failed(e, self._saving)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def _write_failed(self, error: BaseException, step: int | None) -> None:
    self._saving = None  # reported once
    try:
      usage = shutil.disk_usage(self.directory)
      space = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"
    except OSError as e:
      space = f"unknown ({e})"
    committed = [s for s in self._published_steps() if step is None or s < step]
    previous = (f"the previous checkpoint (step {committed[-1]}) is intact and the next run resumes from it"
                if committed else "there is no earlier checkpoint: the next run starts from step 0")
    hint = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space (the disk quota is exceeded)",
            errno.EACCES: "fix the permissions of that directory", errno.EPERM: "fix the permissions of that "
            "directory", errno.EROFS: "use a writable --workdir"}.get(getattr(error, "errno", None), "fix the cause")
    raise CheckpointWriteError(
        f"Writing the checkpoint of step {step} to {self.directory} failed: {_first_line(error)}. Free space on "
        f"that file system: {space}. Nothing was published for step {step}; {previous}. To continue, {hint} "
        "and run the same command again.") from error

  def _published_steps(self) -> list[int]:
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  # --------------------------------------------------------------------------- restoring

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def restore(self, abstract_state, config, step: int | None = None):
    """(state, this process's data-iterator state or None, step) of the newest restorable checkpoint.

    `abstract_state` carries the target shardings (jax.ShapeDtypeStruct leaves).
    Returns None when there is no checkpoint (and none was set aside before).  A checkpoint
    that is provably incomplete or corrupt is moved aside with a warning and the previous one is
    tried; any other failure raises CheckpointRestoreError naming the checkpoint and the cause; a
    checkpoint of another config raises ConfigMismatchError.  When checkpoints exist but none can
    be restored: NoRestorableCheckpointError, unless `config.restart_from_scratch` (then None).
    """
    restart = bool(config.get("restart_from_scratch", False)) if hasattr(config, "get") else False
    steps = self.steps() if step is None else [step]
    set_aside = []
    for candidate in reversed(steps):
      try:
        return self._restore_one(candidate, abstract_state, config)
      except ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        why = corruption(e)
        if why is None and not restart:
          raise CheckpointRestoreError(
              f"Checkpoint {candidate} in {self.directory} cannot be restored: {_first_line(e)}\n"
              "It is not provably corrupt, so it stays where it is and no earlier checkpoint is used instead. "
              "Fix the cause (file permissions, a storage error, or a model whose code changed since the save) "
              "and run again; to give up on the checkpoints and train from step 0, pass "
              "--config.restart_from_scratch=true (they are moved to "
              f"{os.path.join(self.workdir, 'checkpoints_unrestorable')}).") from e
        if step is not None:
          raise unreadable(candidate, self.directory, e) from e
        folder = "checkpoints_corrupt" if why is not None else "checkpoints_unrestorable"
        set_aside.append(self._move_aside(candidate, folder, why or _first_line(e)))
    earlier = self._set_aside_before(exclude=set_aside)
    if set_aside or earlier:
      where = ", ".join(set_aside + earlier)
      if not restart:
        raise NoRestorableCheckpointError(
            f"No checkpoint in {self.directory} can be restored (set aside as corrupt or incomplete: {where}). "
            "The run does not start again from step 0 by itself: look at those checkpoints, or pass "
            "--config.restart_from_scratch=true to train from step 0.")
      if jax.process_index() == 0:
        print(f"WARNING: no checkpoint can be restored ({where}); --config.restart_from_scratch=true: "
              "training from step 0.", flush=True)
      self._move_corrupt_out_of_the_way()
    return None

  def _restore_one(self, candidate: int, abstract_state, config):
    check_complete(self.directory, candidate)
    saved_config = self.saved_config(candidate)
    diffs = config_differences(saved_config, config_to_json(config))
    if diffs:
      raise ConfigMismatchError(
          f"The checkpoint at step {candidate} in {self.directory} was written by a different run:\n  "
          + "\n  ".join(diffs) + "\nUse a new --workdir, or pass the original values to resume.")
    restored = self.manager.restore(candidate, args=ocp.args.Composite(
        state=self._state_restore_args(candidate, abstract_state), data=ocp.args.JsonRestore()))
    data = restored.data or {}
    if data.get("checksum_kind") == CHECKSUM_KIND:
      verify_checksums(restored.state, data.get("checksums"), f"checkpoint {candidate}")
    return restored.state, self._data_state(candidate, data), candidate

  def _state_restore_args(self, candidate: int, abstract_state):
    """PyTreeRestore of `abstract_state`.  A checkpoint written before TrainState had `ema` restores into a run
    without EMA (`ema` empty; with EMA the config differs: ema_decay), through Orbax's partial restore of
    exactly that missing, empty field."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    if getattr(abstract_state, "ema", None) == {}:
      try:
        from etils import epath  # pylint: disable=g-import-not-at-top
        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory) / str(candidate) / "state")
        tree = getattr(tree, "tree", tree)
        if isinstance(tree, dict) and "ema" not in tree:
          return ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=True)
      except Exception:  # pylint: disable=broad-except  (no metadata: restore as usual, errors say why)
        pass
    return ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)

  @staticmethod
  def _data_state(candidate: int, data: dict):
    """This process's iterator position from the saved ones (see vit_jax.data.pipeline)."""
    iterators = data.get("iterators", [])
    if len(iterators) == jax.process_count():
      return iterators[jax.process_index()]
    if iterators and all(isinstance(s, dict) and s.get("order") == "global" for s in iterators):
      # The global example order does not depend on the process count: it continues exactly.
      if jax.process_index() == 0:
        print(f"Checkpoint {candidate} was written by {len(iterators)} process(es), this run has "
              f"{jax.process_count()}: the data set is read in one global order, which continues exactly.",
              flush=True)
      return iterators[0]
    message = (f"checkpoint {candidate} was written by {len(iterators)} process(es), this run has "
               f"{jax.process_count()}, and its data set is a record stream split per process (TFRecord): "
               "its example order cannot be continued, so the input pipeline restarts from the beginning of "
               "the data (examples seen before are seen again; the training state itself is restored exactly). "
               "Data sets stored as ArrayRecord, image folders and digits continue exactly.")
    logging.warning(message)
    if jax.process_index() == 0:
      print(f"WARNING: {message}", flush=True)
    return None

  def _move_aside(self, step: int, folder: str, why: str) -> str:
    where = os.path.join(self.workdir, folder, str(step))
    logging.warning("Checkpoint %d in %s cannot be read (%s); moving it to %s and trying the previous one.",
                    step, self.directory, why, where)
    if jax.process_index() == 0:
      print(f"WARNING: checkpoint {step} cannot be restored ({why}); moved to {where}, "
            "falling back to the previous checkpoint.", flush=True)
      os.makedirs(os.path.dirname(where), exist_ok=True)
      if os.path.exists(where):
        shutil.move(where, f"{where}.{time.strftime('%Y%m%d-%H%M%S')}")
      shutil.move(os.path.join(self.directory, str(step)), where)
    multihost.sync(f"set_aside_{step}")
    self.manager.reload()
    return where

  def _set_aside_before(self, exclude=()) -> list[str]:
    """Checkpoints an earlier run set aside as corrupt (they count as existing ones)."""
    folder = os.path.join(self.workdir, "checkpoints_corrupt")
    try:
      found = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    except OSError:
      return []
    return [f for f in found if f not in exclude]

  def _move_corrupt_out_of_the_way(self) -> None:
    """restart_from_scratch: checkpoints_corrupt/ goes into checkpoints_unrestorable/, so that a later resume
    finds the fresh run's own checkpoints and does not stop at the old corrupt ones (nothing is deleted)."""
    folder = os.path.join(self.workdir, "checkpoints_corrupt")
    if jax.process_index() == 0 and os.path.isdir(folder):
      target = os.path.join(self.workdir, "checkpoints_unrestorable", f"corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(folder, target)
    multihost.sync("restart_from_scratch")
