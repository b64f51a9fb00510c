"""The train loop: one code path from a laptop CPU to a multi-host TPU pod.

    train_and_evaluate(config, workdir)

Start-up validates everything that can be checked without compiling (model and
data set names, mesh vs devices, batch divisibility, image size vs patch size,
the pretrained file) and fails with a message naming the fix.  Then it resumes
from the newest checkpoint in `workdir` if there is one, or creates the state
(already sharded) from scratch or from `config.pretrained`.
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_jax.models import registry
from vit_jax.train import checkpoint as ckpt_lib
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import optim
from vit_jax.train import sharding as shd
from vit_jax.train import state as state_lib
from vit_jax.train import step as step_lib
from vit_jax.train import synthetic

DTYPE_FIELDS = ("dtype", "param_dtype")


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


# ----------------------------------------------------------------------------- building blocks

def model_overrides(config) -> dict[str, Any]:
  """config.model minus `name`, with dtype names turned into dtypes and lists into tuples."""
  overrides = {}
  for key, value in config.model.items():
    if key == "name":
      continue
    if key in DTYPE_FIELDS and isinstance(value, str):
      value = jnp.dtype(value)
    elif isinstance(value, list):
      value = tuple(value)
    overrides[key] = value
  return overrides


def build_model(config, num_classes: int | None = None):
  """The model of `config` (config.model.name + overrides, config.image_size, num_classes)."""
  num_classes = num_classes or config.num_classes
  if not num_classes or num_classes < 1:
    raise ValueError("config.num_classes is not set; it is filled from the data set at start.")
  return registry.get_model(config.model.name, num_classes=num_classes, image_size=config.image_size,
                            **model_overrides(config))


def image_size_of(config) -> tuple[int, int]:
  size = config.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def resolve_num_classes(config) -> int:
  if config.get("num_classes", -1) and config.num_classes > 0:
    return config.num_classes
  if config.dataset == "synthetic":
    raise ValueError("dataset='synthetic' needs config.num_classes > 0.")
  from vit_jax import data
  return int(data.num_classes(config.dataset, data_dir=config.get("data_dir") or None))


def check_dataset_name(config) -> None:
  if config.dataset == "synthetic":
    return
  from vit_jax import data
  try:
    data.num_classes(config.dataset, data_dir=config.get("data_dir") or None)
  except ValueError:
    raise
  except Exception as e:  # e.g. a TFDS DatasetNotFoundError: keep its message, say what to do.
    raise ValueError(f"data set {config.dataset!r} cannot be opened: {e}") from e


def validate(config, num_devices: int | None = None) -> jax.sharding.Mesh:
  """Every check that needs no compilation; returns the mesh.  Raises ValueError naming the fix."""
  registry.lookup(config.model.name)  # unknown model: error listing the valid names
  if config.optimizer not in optim.OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {optim.OPTIMIZERS}.")
  if config.decay_type not in optim.DECAY_TYPES:
    raise ValueError(f"unknown decay_type {config.decay_type!r}; choose one of {optim.DECAY_TYPES}.")
  if config.total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {config.total_steps}.")
  optim.make_optimizer(config)  # schedule and optimiser options
  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  mesh = shd.make_mesh(config.mesh.to_dict(), devices)
  dp = shd.data_parallel_size(mesh)
  accum = max(int(config.get("accum_steps", 1)), 1)
  per_step = dp * accum
  if config.batch_size % per_step or config.batch_size % jax.process_count():
    raise ValueError(
        f"batch_size={config.batch_size} must be divisible by the data-parallel size ({dp} = data "
        f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) times accum_steps ({accum}) = {per_step}"
        + (f" and by the {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f"; use e.g. batch_size={max(per_step, config.batch_size // per_step * per_step)}.")
  if config.eval_batch_size % dp or config.eval_batch_size % jax.process_count():
    raise ValueError(f"eval_batch_size={config.eval_batch_size} must be divisible by the data-parallel "
                     f"size {dp}; use e.g. {max(dp, config.eval_batch_size // dp * dp)}.")
  pretrained = config.get("pretrained") or ""
  if pretrained and not (os.path.exists(pretrained) or os.path.exists(pretrained + ".index")):
    raise FileNotFoundError(f"config.pretrained={pretrained!r} does not exist; give the path of an official "
                            ".npz, a timm .safetensors/.pth or a TF checkpoint, or '' to train from scratch.")
  check_dataset_name(config)
  return mesh


# ----------------------------------------------------------------------------- data

def _iterator(config, num_classes: int, *, train: bool):
  """This process's share of the training (repeating) or evaluation (one padded pass) split."""
  if train:
    split, global_batch, options = config.train_split, config.batch_size, config.get("input", {})
  else:
    split, global_batch, options = config.eval_split, config.eval_batch_size, config.get("input_eval", {})
  pc, pi = jax.process_count(), jax.process_index()
  if config.dataset == "synthetic":
    make = synthetic.SyntheticTrain if train else synthetic.synthetic_eval
    return make(global_batch_size=global_batch, num_classes=num_classes, image_size=image_size_of(config),
                seed=config.seed, process_index=pi, process_count=pc)
  from vit_jax import data
  return data.get_dataset(config.dataset, split, batch_size=global_batch // pc, image_size=config.image_size,
                          train=train, seed=config.seed, data_dir=config.get("data_dir") or None,
                          process_index=pi, process_count=pc, **dict(options))


def train_iterator(config, num_classes: int):
  return _iterator(config, num_classes, train=True)


def eval_iterator(config, num_classes: int):
  return _iterator(config, num_classes, train=False)


def to_global(batch: dict, mesh: jax.sharding.Mesh, keys: tuple[str, ...]) -> dict:
  """This process's rows -> global arrays split over (data, fsdp)."""
  out = {}
  for k in keys:
    local = np.asarray(batch[k])
    out[k] = jax.make_array_from_process_local_data(shd.batch_sharding(mesh, local.ndim), local)
  return out


def evaluate(eval_step, state, config, num_classes: int, mesh) -> dict[str, float]:
  """Top-1 (and top-5 for >= 100 classes) accuracy over the whole split (padded batches are masked)."""
  sums = None
  for batch in eval_iterator(config, num_classes):
    out = eval_step(state, to_global(batch, mesh, ("image", "label", "mask")))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = float(sums["count"])
  result = {"eval_accuracy": float(sums["correct"]) / count, "eval_loss": float(sums["loss_sum"]) / count,
            "eval_examples": count}
  if num_classes >= 100:
    result["eval_top5_accuracy"] = float(sums["correct_top5"]) / count
  return result


def initial_state(config, model, tx, mesh) -> state_lib.TrainState:
  """A fresh sharded TrainState: random, or from `config.pretrained` (zero-initialised head when the
  class count differs, position embeddings resized to config.image_size: vit_jax.load_pretrained)."""
  variables = None
  if config.get("pretrained"):
    import vit_jax
    variables = vit_jax.load_pretrained(config.pretrained, model=config.model.name, num_classes=model.num_classes,
                                        image_size=config.image_size, **model_overrides(config))
  return state_lib.create_train_state(model, tx, mesh, config.seed, variables)


# ----------------------------------------------------------------------------- the loop

class _StopFlag:
  """Set by SIGTERM (preemption); the loop saves a checkpoint at the current step and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([int(flag)], np.int32))))


def _mixup_config(config) -> dict | None:
  mix = config.get("mixup")
  if not mix or not (mix.get("mixup_alpha", 0.0) or mix.get("cutmix_alpha", 0.0)):
    return None
  return dict(mix)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run of `config` in `workdir`; returns the final metrics.

  Writes checkpoints to WORKDIR/checkpoints, TensorBoard events and
  WORKDIR/metrics.jsonl (process 0 only).
  """
  t_start = time.time()
  # SIGTERM from here on means "save and stop" (a preemption during start-up stops at the first step).
  stop = _StopFlag()
  stop.install()
  try:
    return _train_and_evaluate(config, workdir, stop, t_start)
  finally:
    stop.uninstall()


def _train_and_evaluate(config, workdir: str, stop: _StopFlag, t_start: float) -> dict[str, Any]:
  mesh = validate(config)
  config.num_classes = resolve_num_classes(config)
  num_classes = config.num_classes
  model = build_model(config, num_classes)
  tx, lr_schedule = optim.make_optimizer(config)
  # Traces the model (no compilation): a bad image size fails here.
  abstract_state, shardings = state_lib.state_shardings(model, tx, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  logging.info("mesh %s, model %s, %d classes", shd.describe(mesh), config.model.name, num_classes)
  if is_main:
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    print(f"{config.model.name}: {n_params:,} parameters | mesh {shd.describe(mesh)} | "
          f"{jax.process_count()} process(es) | global batch {config.batch_size}", flush=True)

  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  restored = checkpointer.restore(abstract_state, config)
  train_iter = train_iterator(config, num_classes)
  if restored is not None:
    state, data_state, start_step = restored
    if data_state is not None:
      train_iter.set_state(data_state)
    if is_main:
      print(f"Resumed from the checkpoint at step {start_step} in {checkpointer.directory}.", flush=True)
  else:
    state = initial_state(config, model, tx, mesh)
    start_step = 0

  train_step = step_lib.make_train_step(
      model, tx, lr_schedule, mesh, shardings, accum_steps=max(int(config.get("accum_steps", 1)), 1),
      label_smoothing=config.get("label_smoothing", 0.0), mixup=_mixup_config(config))
  eval_step = step_lib.make_eval_step(model, mesh, shardings)
  logger = metrics_lib.MetricsLogger(workdir)
  progress = metrics_lib.Progress(config.total_steps, config.batch_size, config.get("progress_secs", 5.0),
                                  start_step)
  log_every = max(int(config.get("log_every", 10)), 1)
  last_good = start_step if restored is not None else None
  pending = None  # (step, metrics on device, data state after that step's batch)
  window = []
  data_state = train_iter.get_state()
  final = {}

  def check(step, metrics_host):
    loss = float(metrics_host["train_loss"])
    if not math.isfinite(loss):
      where = (f"the last good checkpoint is step {last_good} in {checkpointer.directory}"
               if last_good is not None else "no checkpoint was written yet")
      raise NonFiniteLossError(f"training loss is {loss} at step {step}; stopping. {where}. Lower the learning "
                               "rate, enable gradient clipping (grad_clip_norm) or check the input data.")
    return loss

  def save(step, wait=False):
    nonlocal last_good
    t0 = time.time()
    checkpointer.save(step, state, data_state, config)
    if wait:
      checkpointer.wait()
    last_good = step
    progress.pause(time.time() - t0)

  try:
    step = start_step
    while step < config.total_steps:
      batch = to_global(next(train_iter), mesh, ("image", "label"))
      data_state = train_iter.get_state()
      state, metrics = train_step(state, batch)
      step += 1
      # Fetch the previous step's scalars while this one runs (one step of lag keeps the devices busy).
      if pending is not None:
        prev_step, prev_metrics = pending
        host = jax.device_get(prev_metrics)
        window.append(host)
        check(prev_step, host)
      pending = (step, metrics)

      is_last = step == config.total_steps
      ckpt_due = is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
      eval_due = is_last or (config.eval_every and step % config.eval_every == 0)
      log_due = is_last or step % log_every == 0 or ckpt_due or eval_due or step == start_step + 1
      preempted = stop.requested if jax.process_count() == 1 else (
          step % log_every == 0 and _any_process(stop.requested))
      preempted = preempted or checkpointer.reached_preemption(step)
      if log_due or preempted:
        host = jax.device_get(pending[1])  # this step's loss must be finite before it is saved
        window.append(host)
        pending = None
        loss = check(step, host)
        mean_loss = float(np.mean([float(w["train_loss"]) for w in window]))
        scalars = {"train_loss": mean_loss, "learning_rate": float(host["learning_rate"]),
                   "grad_norm": float(host["grad_norm"])}
        window = []
        if log_due:
          logger.write(step, scalars)
        progress.maybe_report(step, loss, float(host["learning_rate"]), force=is_last)
      if ckpt_due or preempted:
        save(step, wait=preempted)
      if preempted:
        if is_main:
          print(f"Preempted (SIGTERM) at step {step}: checkpoint saved to {checkpointer.directory}; "
                "run the same command again to resume.", flush=True)
        final = {"step": step, "preempted": True}
        return final
      if eval_due:
        t0 = time.time()
        results = evaluate(eval_step, state, config, num_classes, mesh)
        logger.write(step, {k: v for k, v in results.items() if k != "eval_examples"})
        if is_main:
          extra = (f", top-5 {results['eval_top5_accuracy']:.2%}" if "eval_top5_accuracy" in results else "")
          print(f"eval at step {step}: top-1 {results['eval_accuracy']:.2%}{extra} over "
                f"{int(results['eval_examples'])} examples", flush=True)
        final = dict(results, step=step)
        progress.pause(time.time() - t0)
    if not final:  # resumed at total_steps: nothing left to train; still report
      final = dict(evaluate(eval_step, state, config, num_classes, mesh), step=step)
    final["wall_secs"] = time.time() - t_start
    return final
  finally:
    checkpointer.close()
    logger.close()
