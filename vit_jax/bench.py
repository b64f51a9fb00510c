"""Training / inference throughput, MFU and memory of the models, optionally against timm.

  python -m vit_jax.bench --model ViT-B_16 --mode train --batch 256 [--image-size 224]
      [--dtype bfloat16|float32] [--attention xla|cudnn] [--remat] [--scan] [--steps 20]
      [--vs timm] [--peak-tflops 989.4] [--set hidden_size=32 ...] [--out results.jsonl]
  python -m vit_jax.bench --model ViT-L_16 --mode train --find-max-batch [--remat]

Prints one JSON line per configuration (stdout; progress goes to stderr):
  img_per_sec     batch / step_ms
  step_ms         median of --steps timed steps after compilation and warm-up, each ended by
                  `jax.block_until_ready` (the step itself has no host syncs: inputs stay on the device,
                  the state is donated, nothing is fetched)
  compile_s       `jit(...).lower(...).compile()` wall time
  gflops_per_image, tflops_per_sec, mfu
                  analytic model FLOPs (`vit_jax.flops`: 2 x MACs forward, x3 for training), divided by
                  the device's dense bf16 peak (table in `vit_jax.flops`, or --peak-tflops; null on CPU)
  peak_memory_bytes  the device's peak bytes in use (GPU/TPU; null where the backend reports none)
  xla_memory_bytes   XLA's own estimate for the compiled step (arguments + outputs + temporaries)

`--vs timm` first runs the same model, batch, resolution and precision in timm/PyTorch (eager and
torch.compile; bf16 autocast when --dtype bfloat16) with the standalone script benchmarks/timm_bench.py
of the source checkout, in a subprocess, so the two frameworks never hold device memory at the same
time; then it adds timm's figures and the ratios `vs_timm_eager` / `vs_timm_compile` (ours / theirs
img/s). It needs torch, timm and torchvision installed. Sweeps over many configurations and markdown
tables of results files: benchmarks/sweep.py and benchmarks/table.py (see benchmarks/README.md).

On a GPU the tool sets a few defaults before JAX starts (unless --no-gpu-defaults or already set):
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 and the latency-hiding scheduler flag.
"""
from __future__ import annotations

import argparse
import copy
import gc
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

from vit_jax.cli import parse_key_values

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The PyTorch side of --vs timm: a standalone script of the source checkout (it never imports vit_jax).
TIMM_SCRIPT = REPO_ROOT / "benchmarks" / "timm_bench.py"
TIMM_UNAVAILABLE_EXIT = 3  # timm_bench.py's exit status when torch, timm or torchvision is missing

# XLA flags worth having on a single GPU; each is long-standing (an unknown flag aborts XLA).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ arguments



class TimmUnavailable(RuntimeError):
  """--vs timm cannot run here (torch, timm or torchvision missing, or no benchmarks/timm_bench.py)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.bench", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="registered model name, e.g. ViT-B_16 (see vit_jax.list_models())")
  p.add_argument("--mode", choices=("train", "infer"), default="train")
  p.add_argument("--batch", type=int, default=32, help="images per step (one device)")
  p.add_argument("--image-size", type=int, default=None, help="default: the model's native size")
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="compute dtype (parameters and optimiser state stay float32)")
  p.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
  p.add_argument("--remat", action="store_true", help="rematerialise the blocks in the backward pass")
  p.add_argument("--remat-policy", default=None,
                 help="jax.checkpoint_policies entry for --remat (default: the model's, nothing_saveable)")
  p.add_argument("--scan", action="store_true", help="nn.scan over the encoder blocks (ViT)")
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--repeat", type=int, default=1,
                 help="measure N times (with --vs timm: timm, then ours, N times interleaved) and report the "
                      "medians; each round's figures are kept under `rounds`")
  p.add_argument("--compile-only", action="store_true",
                 help="compile the step on abstract inputs (nothing is allocated or run): compile_s and "
                      "xla_memory_bytes only")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a model field (Python literal), e.g. --set hidden_size=64; repeatable")
  p.add_argument("--vs", choices=("timm",), default=None,
                 help="also measure the timm/PyTorch model (benchmarks/timm_bench.py; needs torch, timm, torchvision)")
  p.add_argument("--timm-modes", default="eager,compile",
                 help="comma-separated subset of eager,compile for --vs timm")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="device peak for MFU (default: table of dense bf16 peaks; none on CPU)")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU threads for PyTorch (default: all cores, as XLA uses)")
  p.add_argument("--find-max-batch", action="store_true",
                 help="double, then bisect the batch until the step runs out of device memory")
  p.add_argument("--max-batch", type=int, default=8192, help="upper bound for --find-max-batch")
  p.add_argument("--memory-budget-gb", type=float, default=None,
                 help="--find-max-batch: fit XLA's memory analysis of the compiled step (abstract inputs, "
                      "nothing runs) into this many GiB instead of running until out of memory (e.g. on CPU)")
  p.add_argument("--batch-multiple", type=int, default=8, help="granularity of --find-max-batch")
  p.add_argument("--out", default=None, help="also append the JSON line to this file")
  p.add_argument("--no-gpu-defaults", action="store_true", help="do not set XLA flags / memory fraction")
  p.add_argument("--no-cpu-malloc", action="store_true",
                 help="CPU: keep glibc's default allocator settings (see keep_freed_host_memory)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("batch", "steps", "max_batch", "batch_multiple", "repeat"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if args.warmup < 0:
    p.error("--warmup must be >= 0.")
  if args.remat_policy and not args.remat:
    p.error("--remat-policy needs --remat.")
  if args.memory_budget_gb is not None and (not args.find_max_batch or args.memory_budget_gb <= 0):
    p.error("--memory-budget-gb needs --find-max-batch and a positive number of GiB.")
  if args.compile_only and (args.vs or args.find_max_batch or args.repeat > 1):
    p.error("--compile-only measures compilation alone: drop --vs, --find-max-batch and --repeat.")
  bad = sorted(set(args.timm_modes.split(",")) - {"eager", "compile"})
  if bad:
    p.error(f"--timm-modes accepts eager and/or compile, got {bad}.")
  try:
    args.model_options = parse_key_values(args.overrides, "--set")
  except ValueError as e:
    p.error(str(e))
  return args


# ---------------------------------------------------------------------------------- GPU set-up


def gpu_present() -> bool:
  return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))


def apply_gpu_defaults() -> dict[str, str]:
  """Environment defaults for one GPU; must run before JAX initialises its backend."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # bigger batches for --find-max-batch
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in GPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags
  return {"XLA_FLAGS": flags, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]}


# ---------------------------------------------------------------------------------- CPU set-up

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
CPU_MALLOC_ENV = "GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def keep_freed_host_memory() -> bool:
  """Makes glibc keep the memory XLA:CPU frees instead of returning it to the system; True if applied.

  XLA:CPU allocates a step's temporaries (about 1 GiB for a ViT-S/16 training step at batch 8) anew at
  every execution, from a thread whose allocations glibc serves with a fresh mmap: each step page-faults
  all of it again (250k faults, 0.4 s of system time per step on 2 cores). One arena, no mmap and a 2 GiB
  trim threshold let the next step reuse the same pages (step 15-20% faster on this CPU; the results do
  not change). Process-wide and before JAX starts its threads; the same as the environment setting
  CPU_MALLOC_ENV for any other program (e.g. training on CPU). A no-op where the C library is not glibc.
  """
  import ctypes
  import ctypes.util
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(option, value) == 1
             for option, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))


# ---------------------------------------------------------------------------------- the model


def build_model(args: argparse.Namespace):
  import jax.numpy as jnp
  from vit_jax.models import registry

  fields = set(registry.model_fields(registry.get_family(args.model).module))
  kwargs = dict(args.model_options)
  wanted = {"dtype": jnp.dtype(args.dtype), "attention_implementation": args.attention}
  if args.remat:
    wanted["remat"] = True
    if args.remat_policy:
      wanted["remat_policy"] = args.remat_policy
  if args.scan:
    wanted["scan"] = True
  for key, value in wanted.items():
    if key in fields:
      kwargs.setdefault(key, value)
    elif key in ("remat", "remat_policy", "scan"):
      raise ValueError(f"--{key} is not available for {args.model}: its module has no `{key}` field.")
  return registry.get_model(args.model, num_classes=args.num_classes, image_size=args.image_size, **kwargs)


def image_size(model) -> tuple[int, int]:
  from vit_jax.models.layers import to_2tuple
  return to_2tuple(model.image_size)


def analytic_flops(model, mode: str) -> tuple[float | None, str | None]:
  """FLOPs per image for `mode` (2 x MACs forward, 3 x that for training), or (None, why)."""
  from vit_jax import flops
  try:
    forward = flops.forward_flops(model)
  except (NotImplementedError, AttributeError, ValueError) as e:
    return None, f"{type(e).__name__}: {e}"
  return float(forward * (3 if mode == "train" else 1)), None


# ------------------------------------------------------------------------------- the JAX steps


def make_infer_step(model):
  import jax
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def init_variables(model, seed: int):
  """The model's variables for inference (unboxed), created on the device."""
  import jax
  from flax.linen import meta
  from vit_jax.models import registry

  return jax.jit(lambda key: meta.unbox(registry.init_variables(model, key)))(jax.random.key(seed))


def train_step_and_state(model, seed: int, abstract: bool = False):
  """The training code's own step (`vit_jax.train.step`, AdamW) on a one-device mesh: (state, step).

  `abstract=True` returns the state as ShapeDtypeStructs (nothing is allocated or compiled).
  """
  import jax
  import optax
  from vit_jax.train import sharding as shd
  from vit_jax.train import state as state_lib
  from vit_jax.train import step as step_lib

  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  tx = optax.adamw(1e-4, weight_decay=0.05)
  abstract_state, shardings = state_lib.state_shardings(model, tx, mesh)
  state = abstract_state if abstract else state_lib.create_train_state(model, tx, mesh, seed)
  step = step_lib.make_train_step(model, tx, optax.constant_schedule(1e-4), mesh, shardings)
  return state, step


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_jax(model, args: argparse.Namespace, batch: int) -> dict[str, Any]:
  """Compile and time one configuration; returns the JAX measurement fields."""
  import jax
  import jax.numpy as jnp
  from vit_jax.models import registry

  if getattr(args, "compile_only", False):
    return compile_only(model, args.mode, batch, args.seed)
  data_key = jax.random.key(args.seed + 2)
  images = jax.random.normal(data_key, registry.input_spec(model, batch).shape, jnp.float32)
  labels = jax.random.randint(jax.random.fold_in(data_key, 1), (batch,), 0, model.num_classes)

  if args.mode == "train":
    state, train_step = train_step_and_state(model, args.seed)
    batch_dict = {"image": images, "label": labels}
    start = time.perf_counter()
    compiled = train_step.lower(state, batch_dict).compile()
    compile_s = time.perf_counter() - start

    def run_once(s):
      s, metrics = compiled(s, batch_dict)
      return s, (s, metrics["train_loss"])
  else:
    state = init_variables(model, args.seed)
    infer_step = make_infer_step(model)
    start = time.perf_counter()
    compiled = infer_step.lower(state, images).compile()
    compile_s = time.perf_counter() - start

    def run_once(s):
      out = compiled(s, images)
      return s, out

  for _ in range(args.warmup):
    state, out = run_once(state)
    jax.block_until_ready(out)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, out = run_once(state)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)

  result = {"compile_s": round(compile_s, 3), "step_ms": round(1e3 * statistics.median(times), 3),
            "step_ms_min": round(1e3 * min(times), 3)}
  result["img_per_sec"] = round(batch / statistics.median(times), 3)
  result["xla_memory_bytes"] = _xla_memory(compiled)
  result["peak_memory_bytes"] = _peak_memory()
  if args.mode == "train":
    result["final_loss"] = float(out[1])  # fetched after timing: a sanity value, never inside the loop
  del state, out, compiled
  return result


def compile_only(model, mode: str, batch: int, seed: int = 0) -> dict[str, Any]:
  """Lowers and compiles the step on abstract inputs (ShapeDtypeStructs: nothing is allocated or run):
  {"compile_s", "lower_s", "xla_memory_bytes", "xla_temp_bytes"}."""
  import jax
  import jax.numpy as jnp
  from vit_jax.models import registry

  shape = registry.input_spec(model, batch).shape
  start = time.perf_counter()
  if mode == "train":
    state, step = train_step_and_state(model, seed, abstract=True)
    inputs = {"image": jax.ShapeDtypeStruct(shape, jnp.float32), "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  else:
    state = jax.eval_shape(lambda: init_variables(model, seed))
    step, inputs = make_infer_step(model), jax.ShapeDtypeStruct(shape, jnp.float32)
  lowered = step.lower(state, inputs)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  memory = compiled.memory_analysis()
  return {"compile_s": round(end - lowered_at, 3), "lower_s": round(lowered_at - start, 3),
          "xla_memory_bytes": _xla_memory(compiled),
          "xla_temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}


def _xla_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - getattr(m, "alias_size_in_bytes", 0))
  return int(total)


def _peak_memory() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
  return None if peak is None else int(peak)


def device_info() -> dict[str, Any]:
  import jax
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": d.device_kind, "jax_version": jax.__version__}


# ------------------------------------------------------------------------------------- timm


def timm_spec(model, args: argparse.Namespace, batch: int) -> dict[str, Any]:
  """What benchmarks/timm_bench.py builds: the same architecture, batch, resolution, precision and
  regularisation. `timm_name` is timm's architecture at the native resolution (from the registry); the
  script takes timm's size-specific variant for other sizes where there is one."""
  from vit_jax.models import registry
  name = registry.timm_name(args.model)
  if name is None:
    raise ValueError(f"--vs timm: timm has no counterpart of {args.model!r}.")
  hw = image_size(model)
  try:
    kwargs = registry.get_family(model).timm_kwargs(model, set(args.model_options))
  except ValueError as e:
    raise ValueError(f"--vs timm: {e}") from None
  return {"model": args.model, "timm_name": name, "kwargs": kwargs, "num_classes": model.num_classes,
          "batch": batch, "image_size": list(hw), "dtype": args.dtype, "mode": args.mode, "steps": args.steps,
          "warmup": args.warmup, "modes": args.timm_modes.split(","), "threads": args.threads or os.cpu_count(),
          "seed": args.seed}


def run_timm(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
  """Runs benchmarks/timm_bench.py on `spec` in a subprocess (it imports torch and timm, never vit_jax)."""
  if not TIMM_SCRIPT.is_file():
    raise TimmUnavailable(f"--vs timm runs benchmarks/timm_bench.py of a source checkout of vit_jax; "
                          f"there is none at {TIMM_SCRIPT}.")
  cmd = [sys.executable, str(TIMM_SCRIPT), json.dumps(spec)]
  log(f"[bench] timm: {spec['timm_name']} {spec['kwargs']} ({', '.join(spec['modes'])})")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        timeout=timeout)
  if proc.returncode == TIMM_UNAVAILABLE_EXIT:
    lines = proc.stderr.strip().splitlines() or ["torch, timm or torchvision is missing"]
    raise TimmUnavailable(lines[-1].removeprefix("error: "))
  if proc.returncode != 0:
    raise RuntimeError(f"{TIMM_SCRIPT.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if not lines:
    raise RuntimeError(f"{TIMM_SCRIPT.name} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


# ------------------------------------------------------------------------------ the commands


def bench_one(args: argparse.Namespace) -> dict[str, Any]:
  """One configuration: optional timm subprocess first, then the JAX measurement."""
  from vit_jax.models import registry

  model = build_model(args)
  flop_per_image, flop_note = analytic_flops(model, args.mode)
  if args.vs == "timm":
    registry.abstract_variables(model)  # a model that cannot run (e.g. a bad image size) fails before timm runs
  info = device_info()
  rounds = []
  for r in range(args.repeat):
    timm_result = None
    if args.vs == "timm":
      # Before JAX claims the accelerator (run_jax frees its state at the end of each round): the two
      # frameworks never share device memory.
      timm_result = run_timm(timm_spec(model, args, args.batch))
    log(f"[bench] {args.model} {args.mode} batch={args.batch} on {info['device']} "
        f"(round {r + 1} of {args.repeat}) ...")
    rounds.append((run_jax(model, args, args.batch), timm_result or {}, round(os.getloadavg()[0], 2)))
  measured, timm_result = _medians(rounds, args.batch)
  peak = args.peak_tflops or _table_peak(info["device"])
  record: dict[str, Any] = {
      "model": args.model, "mode": args.mode, "batch": args.batch, "image_size": list(image_size(model)),
      "dtype": args.dtype, "attention": args.attention, "remat": args.remat,
      "remat_policy": model.remat_policy if getattr(model, "remat", False) else None, "scan": args.scan,
      "overrides": args.model_options or None, "steps": args.steps, "repeat": args.repeat, **info,
      "threads": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), **measured,
      "gflops_per_image": None if flop_per_image is None else round(flop_per_image / 1e9, 4),
      "tflops_per_sec": None, "peak_tflops": peak, "mfu": None,
  }
  if args.repeat > 1:
    record["rounds"] = [_round_summary(*r) for r in rounds]
  if args.compile_only:
    record["compile_only"] = True
  if flop_per_image is not None and "img_per_sec" in measured:
    tflops = flop_per_image * measured["img_per_sec"] / 1e12
    record["tflops_per_sec"] = round(tflops, 4)
    record["mfu"] = None if not peak else round(tflops / peak, 4)
  elif flop_note:
    record["flops_note"] = flop_note
  if timm_result:
    record.update(timm_result)
    for variant in ("eager", "compile"):
      theirs = timm_result.get(f"timm_{variant}_img_per_sec")
      record[f"vs_timm_{variant}"] = round(measured["img_per_sec"] / theirs, 3) if theirs else None
  return record


def _medians(rounds: list[tuple[dict, dict]], batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(our fields, timm's fields) over the (ours, timm's) rounds: times (`*_ms`, `*_s`) are the medians of
  the rounds' (each round's step time is itself a median over --steps), img/s follow from the step times,
  the other fields are the first round's."""
  merged = []
  for fields in (dict(rounds[0][0]), dict(rounds[0][1])):
    for k, v in fields.items():
      values = [r[len(merged)].get(k) for r in rounds]
      if k.endswith(("_ms", "_s")) and all(isinstance(x, (int, float)) for x in values):
        fields[k] = round(statistics.median(values), 3)
    for prefix in ("", "timm_eager_", "timm_compile_"):
      if isinstance(fields.get(f"{prefix}step_ms"), (int, float)):
        fields[f"{prefix}img_per_sec"] = round(1e3 * batch / fields[f"{prefix}step_ms"], 3)
    merged.append(fields)
  return merged[0], merged[1]


def _round_summary(ours: dict, theirs: dict, load: float) -> dict[str, Any]:
  keys = ("step_ms", "compile_s", "timm_eager_step_ms", "timm_compile_step_ms")
  return {**{k: d[k] for d in (ours, theirs) for k in keys if k in d}, "load_avg_1m": load}


def _table_peak(device_kind: str) -> float | None:
  from vit_jax import flops
  return flops.peak_tflops(device_kind)


def find_max_batch(args: argparse.Namespace) -> dict[str, Any]:
  """Largest batch whose step compiles and runs: doubling from --batch, then bisection."""
  import jax

  model = build_model(args)
  trials = []

  budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2 ** 30)

  def fits(batch: int) -> bool:
    if budget is not None:  # XLA's figure for the compiled step, nothing runs
      needed = compile_only(model, args.mode, batch, args.seed)["xla_memory_bytes"]
      if needed is None:
        raise ValueError("--memory-budget-gb: this backend reports no memory analysis of compiled programs.")
      ok = needed <= budget
      trials.append([batch, ok, needed])
      log(f"[bench] batch {batch}: {needed / 2 ** 30:.2f} GiB, {'fits' if ok else 'over the budget'}")
      jax.clear_caches()
      return ok
    trial = copy.copy(args)
    trial.steps, trial.warmup = 1, 1
    try:
      run_jax(model, trial, batch)
      ok = True
    except Exception as e:  # noqa: BLE001
      if not is_oom(e):
        raise
      ok = False
    gc.collect()
    jax.clear_caches()
    trials.append([batch, ok])
    log(f"[bench] batch {batch}: {'fits' if ok else 'out of memory'}")
    return ok

  m = args.batch_multiple
  good, bad = 0, None
  batch = max(m, args.batch // m * m)
  while batch <= args.max_batch:
    if not fits(batch):
      bad = batch
      break
    good, batch = batch, batch * 2
  if bad is not None:
    while bad - good > m:
      mid = (good + bad) // 2 // m * m
      if mid <= good:
        break
      if fits(mid):
        good = mid
      else:
        bad = mid
  return {"model": args.model, "mode": args.mode, "find_max_batch": True, "max_batch": good,
          "first_oom_batch": bad, "hit_limit": bad is None, "image_size": list(image_size(model)),
          "dtype": args.dtype, "remat": args.remat,
          "remat_policy": model.remat_policy if getattr(model, "remat", False) else None, "scan": args.scan,
          "memory_budget_gb": args.memory_budget_gb, "trials": trials, **device_info()}


def emit(record: dict[str, Any], out: str | None) -> None:
  """Prints one JSON line and appends it to `out` (also benchmarks/sweep.py's failure records)."""
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
      f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if gpu_present() and not args.no_gpu_defaults:
    log(f"[bench] GPU defaults: {apply_gpu_defaults()}")
  # Process-wide: only as the command (python -m vit_jax.bench), before JAX starts its threads.
  cpu_malloc = __name__ == "__main__" and not gpu_present() and not args.no_cpu_malloc and keep_freed_host_memory()
  try:
    record = find_max_batch(args) if args.find_max_batch else bench_one(args)
  except TimmUnavailable as e:
    raise SystemExit(f"python -m vit_jax.bench: error: {e}") from None  # one line, no traceback
  record["cpu_malloc_tuned"] = cpu_malloc
  record["command"] = "python -m vit_jax.bench " + " ".join(argv)
  emit(record, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
