"""`accum_steps="auto"`: the largest micro-batch whose compiled train step fits the device memory.

    setup = memory.fit_setup(config, setup)      # trainer, after `validate`, before the state is made

For candidate accumulations (divisors of the global batch that keep every
micro-batch split evenly over the data-parallel devices) the *real* train step
of the run (`step.make_train_step` with the run's model, optimiser, state
shardings, EMA, mixup) is lowered on the abstract state and batch and compiled,
and XLA's `memory_analysis()` of the executable gives its per-device footprint:

    arguments + outputs - donated (aliased) + temporaries + generated code
    + the batches the input pipeline keeps on the device ahead of the step (trainer.PREFETCH)

The budget is `config.memory_budget_gb` when set (GB = 2**30 bytes), else the
device's `memory_stats()["bytes_limit"]` (GPU/TPU; XLA's share of the device).
A CPU reports no limit: there the budget must be given.  The smallest
accumulation that fits wins (largest micro-batch: fewest sequential steps);
memory falls with the micro-batch, so candidates are bisected (a handful of
compilations).  The global batch of the recipe, and so the training, stay the
same (`step`: accum_steps=k gives the update of one big batch).  The evaluation
batch is checked the same way (`step.make_eval_step`) and halved until it fits;
it changes nothing in the results.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vit_jax.models.layers import to_2tuple
from vit_jax.train import config_base
from vit_jax.train import sharding as shd
from vit_jax.train import step as step_lib

GIB = 2 ** 30
PREFETCHED_BATCHES = 2  # = trainer.PREFETCH (trainer imports this module)


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Per-device memory of one compiled step (bytes)."""
  accum_steps: int
  micro_batch: int  # global micro-batch (batch_size // accum_steps); for eval, the eval batch
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  prefetch: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.prefetch

  def describe(self) -> str:
    return (f"{size(self.total)} (arguments {size(self.arguments)}, outputs {size(self.outputs)}, "
            f"donated -{size(self.aliased)}, temporaries {size(self.temporaries)}, "
            f"prefetched batches {size(self.prefetch)})")


def size(n: int) -> str:
  """Bytes in GiB (MiB below 1 GiB)."""
  return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2 ** 20:.1f} MiB"


def budget_bytes(config, device=None) -> tuple[int, str]:
  """(per-device budget in bytes, where it comes from)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory statistics)
    stats = {}
  limit = int(stats.get("bytes_limit") or 0)
  given = float(config.get("memory_budget_gb") or 0.0)
  if given < 0:
    raise ValueError(f"memory_budget_gb must be >= 0 (0: the device's own limit), got {given}.")
  if given:
    budget = int(given * GIB)
    if limit and limit < budget:
      return limit, f"the device's limit ({device.device_kind} memory_stats bytes_limit; below memory_budget_gb={given:g})"
    return budget, f"memory_budget_gb={given:g}"
  if limit:
    return limit, f"{device.device_kind} memory_stats()['bytes_limit']"
  raise ValueError(f"accum_steps='auto' needs the device memory, which this device ({device.platform}, "
                   f"{device.device_kind}) does not report: set --config.memory_budget_gb=GB (per device), or give "
                   "accum_steps as a number.")


def candidates(batch_size: int, data_parallel: int, processes: int = 1) -> list[int]:
  """Accumulations k (ascending) that split `batch_size` into equal micro-batches divisible by the
  data-parallel size and the process count."""
  step = data_parallel * processes // _gcd(data_parallel, processes)
  return [k for k in range(1, batch_size + 1) if batch_size % k == 0 and (batch_size // k) % step == 0]


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def footprint(compiled, accum_steps: int, micro_batch: int, prefetch: int) -> Footprint:
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("this backend reports no memory analysis of compiled programs; give accum_steps as a number.")
  return Footprint(accum_steps, micro_batch, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.alias_size_in_bytes), int(m.temp_size_in_bytes), int(m.generated_code_size_in_bytes),
                   prefetch)


def abstract_batch(mesh, batch: int, image_size, keys) -> dict[str, jax.ShapeDtypeStruct]:
  h, w = to_2tuple(image_size)
  shapes = {"image": ((batch, h, w, 3), jnp.float32), "label": ((batch,), jnp.int32), "mask": ((batch,), jnp.bool_)}
  shardings = shd.batch_shardings(mesh, keys)
  return {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=shardings[k]) for k in keys}


def batch_bytes_per_device(batch: dict, mesh) -> int:
  dp = shd.data_parallel_size(mesh)
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in batch.values()) // dp


def compile_train_step(config, setup, accum_steps: int):
  """(the run's train step compiled on the abstract state and batch of `setup` (trainer.Setup) at
  `accum_steps`, its per-device Footprint).  Also `vit_jax.aot`, for a TPU topology."""
  batch = abstract_batch(setup.mesh, config.batch_size, config.image_size, shd.TRAIN_KEYS)
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top  (trainer imports this module)
  compiled = trainer.make_train_step(config, setup, accum_steps).lower(setup.abstract_state, batch).compile()
  return compiled, footprint(compiled, accum_steps, config.batch_size // accum_steps,
                             PREFETCHED_BATCHES * batch_bytes_per_device(batch, setup.mesh))


def train_footprint(config, setup, accum_steps: int) -> Footprint:
  """The compiled train step of `setup` (trainer.Setup) at `accum_steps`: its per-device memory."""
  return compile_train_step(config, setup, accum_steps)[1]


def eval_footprint(config, setup, eval_batch: int) -> Footprint:
  batch = abstract_batch(setup.mesh, eval_batch, config.image_size, shd.EVAL_KEYS)
  eval_step = step_lib.make_eval_step(setup.model, setup.mesh, setup.shardings)
  compiled = eval_step.lower(setup.abstract_state, batch).compile()
  return footprint(compiled, 1, eval_batch, PREFETCHED_BATCHES * batch_bytes_per_device(batch, setup.mesh))


def smallest_fitting(options: list[int], measure: Callable[[int], Footprint], budget: int,
                     ascending_memory: bool = False) -> tuple[int | None, dict[int, Footprint]]:
  """Bisects `options` (sorted so that memory falls along them, or rises with `ascending_memory`) for the
  first that fits `budget` (falling) / the last that fits (rising).  Returns (choice or None, measured)."""
  measured: dict[int, Footprint] = {}
  lo, hi, best = 0, len(options) - 1, None
  while lo <= hi:
    mid = (lo + hi) // 2
    fp = measured.setdefault(options[mid], measure(options[mid]))
    fits = fp.total <= budget
    if fits:
      best = options[mid]
    if fits != ascending_memory:  # falling memory: look for an earlier fit; rising: for a later one
      hi = mid - 1
    else:
      lo = mid + 1
  return best, measured


def choose_accum_steps(config, setup, budget: int) -> tuple[int | None, dict[int, Footprint]]:
  """(smallest accumulation whose step fits `budget` or None, {accum: footprint} of those compiled)."""
  options = candidates(config.batch_size, shd.data_parallel_size(setup.mesh), jax.process_count())
  return smallest_fitting(options, lambda k: train_footprint(config, setup, k), budget)


def fit_setup(config, setup, *, log: Callable[[str], Any] = print):
  """`setup` with `accum_steps` resolved when config.accum_steps is "auto" (and config.eval_batch_size lowered
  when the evaluation step would not fit); prints the choice and the memory figures.  Raises ValueError
  naming the budget when even the smallest micro-batch does not fit."""
  if config_base.accum_steps_option(config) != "auto":
    return setup
  budget, source = budget_bytes(config)
  choice, measured = choose_accum_steps(config, setup, budget)
  table = "; ".join(f"micro-batch {fp.micro_batch}: {size(fp.total)}"
                    for _, fp in sorted(measured.items()))
  if choice is None:
    smallest = measured[max(measured)]
    raise ValueError(
        f"accum_steps='auto': even a micro-batch of {smallest.micro_batch} needs {smallest.describe()} per device, "
        f"over the budget of {size(budget)} ({source}). Use a smaller model or image size, "
        "model.remat=True, bfloat16 compute (model.dtype), or more devices (FSDP: mesh.fsdp).")
  fp = measured[choice]
  log(f"accum_steps=auto: {choice} micro-batch(es) of {fp.micro_batch} (global batch {config.batch_size}); the "
      f"step needs {fp.describe()} per device of a {size(budget)} budget ({source}). Compiled: {table}.")
  setup = dataclasses.replace(setup, accum_steps=choice)
  full = eval_footprint(config, setup, config.eval_batch_size)
  if full.total > budget:  # evaluate in smaller batches (the results do not change)
    splits = candidates(config.eval_batch_size, shd.data_parallel_size(setup.mesh), jax.process_count())
    smaller = [config.eval_batch_size // k for k in splits if k > 1]  # falling memory
    if not smaller:
      log(f"accum_steps=auto: eval_batch_size {config.eval_batch_size} needs {size(full.total)}, over the "
          "budget, and cannot be split further over the devices.")
      return setup
    best, measured_eval = smallest_fitting(smaller, lambda b: eval_footprint(config, setup, b), budget)
    best = smaller[-1] if best is None else best
    log(f"accum_steps=auto: eval_batch_size {config.eval_batch_size} needs {size(full.total)}; evaluating "
        f"in batches of {best}" + (f" ({size(measured_eval[best].total)})." if best in measured_eval else "."))
    config.eval_batch_size = best
  return setup
