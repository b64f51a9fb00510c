"""The train loop: one code path from a laptop CPU to a multi-host TPU pod.

    train_and_evaluate(config, workdir)

Start-up (`validate`) checks everything that can be checked without compiling
(model and data set names, mesh vs devices, batch divisibility, durations,
image size vs patch size, the pretrained file) and fails with a message naming
the fix; it returns what it computed (`Setup`: mesh, opened data set, class
count, durations in steps, model, optimiser, state layout), which the run uses
as is.  Then the run resumes from the newest checkpoint in `workdir` if there is
one, or creates the state (already sharded) from scratch or from
`config.pretrained`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vit_jax import data
from vit_jax import fewshot as fewshot_lib
from vit_jax.data import device, synthetic
from vit_jax.models.layers import to_2tuple
from vit_jax.train import checkpoint as ckpt_lib
from vit_jax.train import config_base
from vit_jax.train import lock as lock_lib
from vit_jax.train import memory as memory_lib
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import multihost
from vit_jax.train import optim
from vit_jax.train import sharding as shd
from vit_jax.train import state as state_lib
from vit_jax.train import step as step_lib
from vit_jax.train.config_base import build_model  # also trainer.build_model, as before

PREFETCH = 2  # batches put on the devices ahead of the step that uses them


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""

  def __init__(self, message: str, step: int | None = None, loss: float | None = None):
    super().__init__(message)
    self.step, self.loss = step, loss


# ----------------------------------------------------------------------------- start-up

@dataclasses.dataclass(frozen=True)
class Setup:
  """What start-up computed, once; the run uses it instead of computing it again."""
  mesh: jax.sharding.Mesh
  source: Any  # config.dataset, opened (vit_jax.data.get_source)
  num_classes: int
  train_examples: int  # in config.train_split, all processes together
  total_steps: int
  warmup_steps: int
  model: nn.Module
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: state_lib.TrainState  # shapes and dtypes with their shardings (the restore target)
  shardings: state_lib.TrainState
  accum_steps: int | str = 1  # config.accum_steps checked; "auto" until memory.fit_setup resolves it


def open_dataset(config):
  """config.dataset opened once; a data set that cannot be opened raises a ValueError saying so."""
  options = {k: config.input[k] for k in ("manual_dir", "download") if k in config.input}
  try:
    return data.get_source(config.dataset, config.data_dir or None, **options)
  except ValueError:
    raise
  except Exception as e:  # e.g. a TFDS DatasetNotFoundError: keep its message, say what to do.
    raise ValueError(f"data set {config.dataset!r} cannot be opened: {e}") from e


def _dataset_sizes(config, source) -> tuple[int, int]:
  """(class count, number of training examples) of the opened data set."""
  num_classes = config.num_classes if config.num_classes > 0 else source.num_classes
  try:
    train_examples = source.num_examples(config.train_split)
  except ValueError:
    raise
  except Exception as e:
    raise ValueError(f"split {config.train_split!r} of data set {config.dataset!r} cannot be read: {e}") from e
  return int(num_classes), int(train_examples)


def _check_batch_sizes(config, mesh) -> None:
  dp = shd.data_parallel_size(mesh)
  accum = config_base.accum_steps_option(config)
  accum = 1 if accum == "auto" else accum  # "auto" only picks accumulations that divide the batch
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


def validate(config, num_devices: int | None = None) -> Setup:
  """Every check that needs no compilation; returns what it computed.  Raises ValueError naming the fix.

  The cheap checks come first, so that a typo fails before a data set is opened (or downloaded).
  """
  overrides = config_base.check_model(config)  # unknown model or option: the valid names
  if config.optimizer not in optim.OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {optim.OPTIMIZERS}.")
  if config.decay_type not in optim.DECAY_TYPES:
    raise ValueError(f"unknown decay_type {config.decay_type!r}; choose one of {optim.DECAY_TYPES}.")
  step_lib.check_dropout_rng_impl(config.dropout_rng_impl)
  accum_steps = config_base.accum_steps_option(config)
  if accum_steps == "auto":
    memory_lib.budget_bytes(config)  # a CPU without memory_budget_gb fails here, before the data set opens
  config_base.ema_options(config)  # a bad ema_decay fails before the data set opens
  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  mesh = shd.make_mesh(config.mesh.to_dict(), devices)
  _check_batch_sizes(config, mesh)
  pretrained = config_base.pretrained_source(config)  # None: scratch; raises when a recipe needs one
  if pretrained:  # a path, a catalogue name or a URI (downloaded into the cache when the state is made)
    from vit_jax.weights import hub
    try:
      hub.check_source(pretrained)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.pretrained: {e} Give an official .npz, a timm .safetensors/.pth, a TF "
                              "checkpoint, a catalogue name or a URI, or '' to train from scratch.") from None
  source = open_dataset(config)
  num_classes, train_examples = _dataset_sizes(config, source)
  return plan(config, mesh, num_classes, train_examples, overrides=overrides, source=source)


def plan(config, mesh: jax.sharding.Mesh, num_classes: int, train_examples: int, *,
         overrides: dict | None = None, source=None) -> Setup:
  """The run's model, optimiser and abstract sharded state on `mesh`, from the data set's class count and
  size alone: no data read, no parameter materialised (`validate` after opening the data set; `vit_jax.aot`
  for a TPU topology that is not attached)."""
  overrides = config_base.check_model(config) if overrides is None else overrides
  total_steps, warmup_steps = config_base.training_steps(config, train_examples)
  model = build_model(config, num_classes, overrides)  # the model checks its options (e.g. the image size)
  # Schedule and optimiser options (layer_decay, frozen: the model's parameter paths).
  tx, lr_schedule = optim.make_optimizer(config, total_steps, warmup_steps, model=model)
  # Traces the model, no compilation.
  ema = config_base.ema_options(config)
  abstract_state, shardings = state_lib.state_shardings(model, tx, mesh, ema=ema is not None)
  return Setup(mesh=mesh, source=source, num_classes=num_classes, train_examples=train_examples,
               total_steps=total_steps, warmup_steps=warmup_steps, model=model, tx=tx, lr_schedule=lr_schedule,
               abstract_state=abstract_state, shardings=shardings, accum_steps=config_base.accum_steps_option(config))


def make_train_step(config, setup: Setup, accum_steps: int | None = None):
  """The jitted train step of the run (`step.make_train_step` with the config's options); `accum_steps`
  defaults to the setup's (resolved) one."""
  return step_lib.make_train_step(
      setup.model, setup.tx, setup.lr_schedule, setup.mesh, setup.shardings,
      accum_steps=setup.accum_steps if accum_steps is None else accum_steps,
      label_smoothing=config.label_smoothing, mixup=_mixup_options(config), ema=config_base.ema_options(config),
      dropout_rng_impl=config.dropout_rng_impl)


# ----------------------------------------------------------------------------- data

def _iterator(config, num_classes: int, *, train: bool, source=None):
  """This process's share of the training (repeating) or evaluation (one padded pass) split, on the host."""
  if train:
    split, global_batch, options = config.train_split, config.batch_size, config.input
  else:
    split, global_batch, options = config.eval_split, config.eval_batch_size, config.input_eval
  pc, pi = jax.process_count(), jax.process_index()
  if config.dataset == synthetic.NAME:
    make = synthetic.SyntheticTrain if train else synthetic.synthetic_eval
    return make(global_batch_size=global_batch, num_classes=num_classes, image_size=to_2tuple(config.image_size),
                seed=config.seed, process_index=pi, process_count=pc)
  return data.get_dataset(config.dataset, split, batch_size=global_batch // pc, image_size=config.image_size,
                          train=train, seed=config.seed, data_dir=config.data_dir or None, process_index=pi,
                          process_count=pc, source=source,
                          **{"max_bad_fraction": config.get("max_bad_fraction", 0.01), **dict(options)})


def train_iterator(config, num_classes: int, source=None):
  return _iterator(config, num_classes, train=True, source=source)


def eval_iterator(config, num_classes: int, source=None):
  return _iterator(config, num_classes, train=False, source=source)


def evaluate(eval_step, state, config, setup: Setup) -> dict[str, float]:
  """Top-1 (and top-5 for >= 100 classes) accuracy over the whole split (padded batches are masked)."""
  batches = device.prefetch_to_device(eval_iterator(config, setup.num_classes, setup.source), PREFETCH,
                                      shd.batch_shardings(setup.mesh, shd.EVAL_KEYS))
  sums = None
  for batch in batches:
    out = eval_step(state, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = float(sums["count"])
  # Every example of the split once: only undecodable ones (counted, and at most max_bad_fraction) may lack.
  skipped = sum(multihost.allgather_json(batches.skipped))
  expected = setup.source.num_examples(config.eval_split)
  if int(count) + skipped != expected:
    raise ValueError(f"evaluation covered {int(count)} examples of {config.dataset} {config.eval_split!r} "
                     f"(+ {skipped} undecodable, skipped), but the split has {expected}: the input pipeline lost "
                     "or repeated examples. Check the data set (a rebuilt or truncated split?).")
  result = {"eval_accuracy": float(sums["correct"]) / count, "eval_loss": float(sums["loss_sum"]) / count,
            "eval_examples": count, "eval_skipped": skipped}
  if setup.num_classes >= 100:
    result["eval_top5_accuracy"] = float(sums["correct_top5"]) / count
  return result


def initial_state(config, setup: Setup, report: list | None = None) -> state_lib.TrainState:
  """A fresh sharded TrainState: random, or from `config.pretrained` (zero-initialised head when the
  class count differs, position embeddings resized to config.image_size: weights.core.load_pretrained).
  `report` (a list) receives one line saying where the weights came from and how they were adapted."""
  variables = None
  pretrained = config_base.pretrained_source(config)
  if pretrained:
    from vit_jax.weights import core
    notes = []
    variables = core.load_pretrained(pretrained, model=setup.model, report=notes)
    origin = f"pretrained weights {pretrained!r}" + (f" ({'; '.join(notes)})" if notes else "")
  else:
    origin = f"random weights (seed {config.seed}; config.pretrained={config.pretrained!r}: from scratch)"
  if report is not None:
    report.append(origin)
  return state_lib.create_train_state(setup.model, setup.tx, setup.mesh, config.seed, variables, setup.shardings)


# ----------------------------------------------------------------------------- loop helpers

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

  def anywhere(self, step: int, every: int) -> bool:
    """Whether some process got SIGTERM; with several processes they agree every `every` steps."""
    if jax.process_count() == 1:
      return self.requested
    return step % every == 0 and multihost.any_process(self.requested)


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Which periodic actions are due after a step: each at the multiples of its period (0: never),
  and all of them at the last step."""
  last_step: int
  periods: dict[str, int]

  def __call__(self, step: int) -> set[str]:
    return {name for name, every in self.periods.items()
            if step == self.last_step or (every > 0 and step % every == 0)}


class LaggedMetrics:
  """The train step's metrics, fetched to the host one step late (while the next step runs), so
  that reading them never stalls the devices.  Every fetched loss must be finite."""

  def __init__(self):
    self._pending = None  # (step, metrics on the devices)
    self._window = []  # host metrics since the last `flush`
    self.last = None  # host metrics of the newest fetched step

  def push(self, step: int, metrics: dict) -> None:
    """Holds this step's metrics and fetches the previous step's (raises NonFiniteLossError)."""
    self._fetch()
    self._pending = (step, metrics)

  def flush(self) -> dict[str, float]:
    """Waits for the pending step; the mean loss since the last flush and the newest learning rate and
    gradient norm."""
    self._fetch()
    window, self._window = self._window, []
    return {"train_loss": float(np.mean([float(w["train_loss"]) for w in window])),
            "learning_rate": float(self.last["learning_rate"]), "grad_norm": float(self.last["grad_norm"])}

  def _fetch(self) -> None:
    if self._pending is None:
      return
    (step, metrics), self._pending = self._pending, None
    host = jax.device_get(metrics)
    loss = float(host["train_loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(f"training loss is {loss} at step {step}", step, loss)
    self._window.append(host)
    self.last = host


def _evaluate_and_log(eval_step, state, config, setup: Setup, step: int, logger) -> dict[str, Any]:
  results = evaluate(eval_step, state, config, setup)
  if state_lib.has_ema(state):  # the EMA weights too, logged as eval_ema_*
    ema = evaluate(eval_step, state_lib.ema_view(state), config, setup)
    results.update({k.replace("eval_", "eval_ema_", 1): v for k, v in ema.items()
                    if k not in ("eval_examples", "eval_skipped")})
  logger.write(step, {k: v for k, v in results.items() if k not in ("eval_examples", "eval_skipped")})
  if jax.process_index() == 0:
    extra = f", top-5 {results['eval_top5_accuracy']:.2%}" if "eval_top5_accuracy" in results else ""
    ema = f"; EMA weights: top-1 {results['eval_ema_accuracy']:.2%}" if "eval_ema_accuracy" in results else ""
    skipped = f" ({results['eval_skipped']} undecodable skipped)" if results.get("eval_skipped") else ""
    print(f"eval at step {step}: top-1 {results['eval_accuracy']:.2%}{extra} over "
          f"{int(results['eval_examples'])} examples{skipped}{ema}", flush=True)
  return dict(results, step=step)


# ----------------------------------------------------------------------------- the run

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
    # One run per workdir: a second one stops here, naming the first (host, PID).
    with lock_lib.lock_workdir(workdir):
      return _train_and_evaluate(config, workdir, stop, t_start)
  finally:
    stop.uninstall()


def _announce(config, setup: Setup, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
    print(f"{config.model.name}: {n_params:,} parameters | mesh {shd.describe(setup.mesh)} | "
          f"{jax.process_count()} process(es) | global batch {config.batch_size}", flush=True)
  logging.info("model %s, %d classes, %d steps (%d warm-up), %d training examples", config.model.name,
               setup.num_classes, setup.total_steps, setup.warmup_steps, setup.train_examples)


def _resume_or_start(config, setup: Setup, checkpointer, train_iter) -> tuple[state_lib.TrainState, int | None]:
  """(state, step of the checkpoint resumed from or None): the newest checkpoint with the input
  pipeline's position, else a fresh state.  A workdir with checkpoints is always resumed: config.pretrained
  only ever initialises a new run.  The line printed says which of the two happened, and from what."""
  restored = checkpointer.restore(setup.abstract_state, config)
  if restored is None:
    report = []
    state = initial_state(config, setup, report)
    if jax.process_index() == 0:
      print(f"Started a new run in {checkpointer.workdir} (no checkpoint there) from {report[0]}.", flush=True)
    return state, None
  state, data_state, step = restored
  if data_state is not None:
    train_iter.set_state(data_state)
  if jax.process_index() == 0:
    unused = (f"; config.pretrained={config.pretrained!r} is not loaded: it only initialises a new run"
              if config.get("pretrained") and config.pretrained.strip().lower() not in config_base.SCRATCH else "")
    print(f"Resumed from the checkpoint at step {step} in {checkpointer.directory}{unused}.", flush=True)
  return state, step


def _train_and_evaluate(config, workdir: str, stop: _StopFlag, t_start: float) -> dict[str, Any]:
  config_base.enable_compilation_cache(config)  # before anything compiles
  setup = validate(config)
  # accum_steps="auto": compile the step for candidate micro-batches, keep the largest that fits.
  setup = memory_lib.fit_setup(config, setup, log=_print0)
  config.num_classes = setup.num_classes  # saved with the checkpoints: vit_jax.restore rebuilds the model
  _announce(config, setup, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  train_iter = device.prefetch_to_device(train_iterator(config, setup.num_classes, setup.source), PREFETCH,
                                         shd.batch_shardings(setup.mesh, shd.TRAIN_KEYS))
  state, resumed_at = _resume_or_start(config, setup, checkpointer, train_iter)
  start_step = resumed_at or 0
  last_good = resumed_at  # the newest checkpoint of a finite loss (named when the loss goes bad)

  total = setup.total_steps
  train_step = make_train_step(config, setup)
  eval_step = step_lib.make_eval_step(setup.model, setup.mesh, setup.shardings)
  # Opens its data set now, so that a bad name fails before training.
  fewshot_eval = fewshot_lib.TrainingEvaluator(config, setup) if config.fewshot.dataset else None
  logger = metrics_lib.MetricsLogger(workdir)
  progress = metrics_lib.Progress(total, config.batch_size, config.progress_secs, start_step)
  log_every = max(config.log_every, 1)
  periodic = Periodic(total, {"log": log_every, "checkpoint": config.checkpoint_every, "eval": config.eval_every,
                              **({"fewshot": config.fewshot_every} if fewshot_eval else {})})
  lagged = LaggedMetrics()
  final = {}
  try:
    step = start_step
    while step < total:
      state, metrics = train_step(state, next(train_iter))
      step += 1
      lagged.push(step, metrics)
      due = periodic(step) | ({"log"} if step == start_step + 1 else set())  # the first step: compile time
      preempted = stop.anywhere(step, log_every) or checkpointer.reached_preemption(step)
      if due or preempted:  # log; this step's loss must be finite before it is saved
        checkpointer.check_for_errors()  # a failed asynchronous save stops the run now, not at the next save
        logger.write(step, lagged.flush())
        progress.maybe_report(step, float(lagged.last["train_loss"]), float(lagged.last["learning_rate"]),
                              force=step == total)
      if "checkpoint" in due or preempted:
        with progress.paused():
          checkpointer.save(step, state, train_iter.get_state(), config)
          if preempted:
            checkpointer.wait()
        last_good = step
      if preempted:
        if jax.process_index() == 0:
          print(f"Preempted (SIGTERM) at step {step}: checkpoint saved to {checkpointer.directory}; "
                "run the same command again to resume.", flush=True)
        return {"step": step, "preempted": True}
      if "eval" in due:
        with progress.paused():
          final = _evaluate_and_log(eval_step, state, config, setup, step, logger)
      if "fewshot" in due:
        with progress.paused():
          fewshot_results = fewshot_eval(state)
        logger.write(step, fewshot_results)
        final.update(fewshot_results)
    if not final:  # resumed at total_steps: nothing left to train; still report
      final = dict(evaluate(eval_step, state, config, setup), step=step)
    final["wall_secs"] = time.time() - t_start
    return final
  except NonFiniteLossError as e:
    where = (f"the last good checkpoint is step {last_good} in {checkpointer.directory}"
             if last_good is not None else "no checkpoint was written yet")
    raise NonFiniteLossError(f"{e}; stopping. {where}. Lower the learning rate, enable gradient clipping "
                             "(grad_clip_norm) or check the input data.", e.step, e.loss) from None
  finally:
    checkpointer.close()
    logger.close()


def _print0(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def _mixup_options(config) -> dict | None:
  """config.mixup for the train step, or None when both alphas are 0."""
  if not (config.mixup.mixup_alpha or config.mixup.cutmix_alpha):
    return None
  return config.mixup.to_dict()
