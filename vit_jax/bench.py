"""Training / inference throughput, MFU and memory of the models, optionally against timm.

  python -m vit_jax.bench --model ViT-B_16 --mode train --batch 256 [--image-size 224]
      [--dtype bfloat16|float32] [--attention xla|cudnn] [--remat] [--scan] [--steps 20]
      [--vs timm] [--peak-tflops 989.4] [--set hidden_size=32 ...] [--out results.jsonl]
  python -m vit_jax.bench --sweep benchmarks/sweep.jsonl --vs timm --out benchmarks/results/h100.jsonl
  python -m vit_jax.bench --model ViT-L_16 --mode train --find-max-batch [--remat]
  python -m vit_jax.bench --table benchmarks/results/cpu.jsonl      # markdown table of a results file

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

`--vs timm` first runs the same model, batch, resolution and precision in timm/PyTorch in a
subprocess (eager and torch.compile; bf16 autocast when --dtype bfloat16), so the two frameworks
never hold device memory at the same time, then adds timm's figures and the ratios
`vs_timm_eager` / `vs_timm_compile` (ours / theirs img/s).

On a GPU the tool sets a few defaults before JAX starts (unless --no-gpu-defaults or already set):
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 and the latency-hiding scheduler flag.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
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

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Our names -> timm names at the native resolution; other sizes use the size-specific
# timm variant when there is one (see `timm_model_name`), else `img_size=`.
TIMM_NAMES = {
    "ViT-Ti_16": "vit_tiny_patch16_224",
    "ViT-S_16": "vit_small_patch16_224",
    "ViT-S_32": "vit_small_patch32_224",
    "ViT-B_8": "vit_base_patch8_224",
    "ViT-B_16": "vit_base_patch16_224",
    "ViT-B_32": "vit_base_patch32_224",
    "ViT-L_16": "vit_large_patch16_224",
    "ViT-L_32": "vit_large_patch32_224",
    "ViT-H_14": "vit_huge_patch14_224",
    "R+ViT-Ti_16": "vit_tiny_r_s16_p8_224",
    "R26+ViT-S_32": "vit_small_r26_s32_224",
    "R50+ViT-B_16": "vit_base_r50_s16_224",
    "R50+ViT-L_32": "vit_large_r50_s32_224",
    "CrossViT-Ti": "crossvit_tiny_240",
    "CrossViT-S": "crossvit_small_240",
    "CrossViT-B": "crossvit_base_240",
    "CrossViT-9": "crossvit_9_240",
    "CrossViT-15": "crossvit_15_240",
    "CrossViT-18": "crossvit_18_240",
    "CrossViT-9-dagger": "crossvit_9_dagger_240",
    "CrossViT-15-dagger": "crossvit_15_dagger_240",
    "CrossViT-18-dagger": "crossvit_18_dagger_240",
    "MaxViT-T": "maxvit_tiny_tf_224",
    "MaxViT-S": "maxvit_small_tf_224",
    "MaxViT-B": "maxvit_base_tf_224",
    "MaxViT-L": "maxvit_large_tf_224",
    "MaxViT-XL": "maxvit_xlarge_tf_384",
}

# XLA flags worth having on a single GPU; each is long-standing (an unknown flag aborts XLA).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)

DEFAULT_SWEEP = REPO_ROOT / "benchmarks" / "sweep.jsonl"


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m vit_jax.bench", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="registered model name, e.g. ViT-B_16 (see vit_jax.list_models())")
  p.add_argument("--mode", choices=("train", "infer"), default="train")
  p.add_argument("--batch", type=int, default=32, help="images per step (one device)")
  p.add_argument("--image-size", type=int, default=None, help="default: the model's native size")
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="compute dtype (parameters and optimiser state stay float32)")
  p.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
  p.add_argument("--remat", action="store_true", help="rematerialise the blocks in the backward pass")
  p.add_argument("--scan", action="store_true", help="nn.scan over the encoder blocks (ViT)")
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a model field (Python literal), e.g. --set hidden_size=64; repeatable")
  p.add_argument("--vs", choices=("timm",), default=None, help="also measure the timm/PyTorch model")
  p.add_argument("--timm-modes", default="eager,compile",
                 help="comma-separated subset of eager,compile for --vs timm")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="device peak for MFU (default: table of dense bf16 peaks; none on CPU)")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU threads for PyTorch (default: all cores, as XLA uses)")
  p.add_argument("--find-max-batch", action="store_true",
                 help="double, then bisect the batch until the step runs out of device memory")
  p.add_argument("--max-batch", type=int, default=8192, help="upper bound for --find-max-batch")
  p.add_argument("--batch-multiple", type=int, default=8, help="granularity of --find-max-batch")
  p.add_argument("--sweep", nargs="?", const=str(DEFAULT_SWEEP), default=None, metavar="FILE",
                 help="run every configuration of a JSON-lines file, each in a fresh process "
                      f"(default {DEFAULT_SWEEP.relative_to(REPO_ROOT)})")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--table", nargs="+", default=None, metavar="FILE",
                 help="print a markdown table of result files (JSON lines) and exit")
  p.add_argument("--no-gpu-defaults", action="store_true", help="do not set XLA flags / memory fraction")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timm-worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.timm_worker is None and args.table is None and args.sweep is None and not args.model:
    p.error("--model is required (or --sweep / --table).")
  for name in ("batch", "steps", "max_batch", "batch_multiple"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if args.warmup < 0:
    p.error("--warmup must be >= 0.")
  bad = sorted(set(args.timm_modes.split(",")) - {"eager", "compile"})
  if bad:
    p.error(f"--timm-modes accepts eager and/or compile, got {bad}.")
  return args


def parse_overrides(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects FIELD=VALUE (e.g. --set hidden_size=64), got {item!r}.")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value  # a bare string such as classifier=gap
  return out


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


# ---------------------------------------------------------------------------------- the model


def build_model(args: argparse.Namespace):
  import jax.numpy as jnp
  from vit_jax.models import registry

  _, module_cls, _ = registry.lookup(args.model)
  fields = set(registry.model_fields(module_cls))
  kwargs = parse_overrides(args.overrides)
  wanted = {"dtype": jnp.dtype(args.dtype), "attention_implementation": args.attention}
  if args.remat:
    wanted["remat"] = True
  if args.scan:
    wanted["scan"] = True
  for key, value in wanted.items():
    if key in fields:
      kwargs.setdefault(key, value)
    elif key in ("remat", "scan"):
      raise ValueError(f"--{key} is not available for {args.model}: its module has no `{key}` field.")
  return registry.get_model(args.model, num_classes=args.num_classes, image_size=args.image_size, **kwargs)


def image_hw(model) -> tuple[int, int]:
  size = model.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


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
  """The model's variables for inference, created on the device."""
  import jax
  import jax.numpy as jnp

  h, w = image_hw(model)
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, h, w, 3), jnp.float32), train=False))(jax.random.key(seed))


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

  h, w = image_hw(model)
  data_key = jax.random.key(args.seed + 2)
  images = jax.random.normal(data_key, (batch, h, w, 3), jnp.float32)
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


def timm_model_name(model_name: str, image_size, is_model) -> tuple[str, dict[str, Any]]:
  """timm name plus extra create_model kwargs for our `model_name` at `image_size`.

  The size-specific timm variant when `is_model` (timm.is_model) knows it
  (e.g. vit_base_patch16_384, maxvit_tiny_tf_512), else the native one with `img_size=`.
  """
  if model_name not in TIMM_NAMES:
    raise ValueError(f"no timm counterpart known for {model_name!r}; known: {', '.join(TIMM_NAMES)}.")
  name = TIMM_NAMES[model_name]
  h, w = image_size
  base, native = name.rsplit("_", 1)
  if (h, w) == (int(native), int(native)):
    return name, {}
  if h == w and is_model(f"{base}_{h}"):
    return f"{base}_{h}", {}
  return name, {"img_size": h if h == w else (h, w)}


def timm_spec(model, args: argparse.Namespace, batch: int) -> dict[str, Any]:
  """What the timm worker builds: same architecture, batch, resolution, precision, regularisation."""
  from vit_jax.models import registry
  family = registry.model_family(args.model)
  hw = image_hw(model)
  overrides = parse_overrides(args.overrides)
  arch = {k: v for k, v in overrides.items() if k not in ("dropout_rate", "attention_dropout_rate",
                                                          "drop_path_rate", "dtype", "param_dtype")}
  name, kwargs = None, {}  # name None: the worker picks it with timm_model_name
  if family == "vit" and getattr(model, "resnet", None) is None:
    # Plain ViT: give timm the full architecture so overridden (e.g. tiny) configs match too.
    name = TIMM_NAMES.get(args.model, "vit_base_patch16_224")
    patch = model.patch_size if isinstance(model.patch_size, int) else tuple(model.patch_size)
    kwargs.update(img_size=hw[0] if hw[0] == hw[1] else hw, patch_size=patch, embed_dim=model.hidden_size,
                  depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_dim / model.hidden_size)
    if model.classifier == "gap":
      kwargs.update(class_token=False, global_pool="avg")
  elif arch:
    raise ValueError(f"--vs timm with --set {sorted(arch)} is supported for plain ViT models only "
                     f"(timm's {family} models take no such overrides).")
  # The same regularisation (it costs time in training): timm's names for our rates.
  dropout = getattr(model, "dropout_rate", 0.0)
  rates = {"drop_path_rate": getattr(model, "drop_path_rate", 0.0)}
  if family == "vit":
    rates.update(proj_drop_rate=dropout, pos_drop_rate=dropout,
                 attn_drop_rate=getattr(model, "attention_dropout_rate", 0.0))
  elif family == "crossvit":
    rates.update(drop_rate=dropout, attn_drop_rate=getattr(model, "attention_dropout_rate", 0.0))
  else:
    rates.update(drop_rate=dropout)
  kwargs.update({k: float(v) for k, v in rates.items() if v})
  return {"model": args.model, "timm_name": name, "kwargs": kwargs, "num_classes": model.num_classes,
          "batch": batch, "image_size": list(hw), "dtype": args.dtype, "mode": args.mode, "steps": args.steps,
          "warmup": args.warmup, "modes": args.timm_modes.split(","), "threads": args.threads or os.cpu_count(),
          "seed": args.seed}


def run_timm_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
  # This file runs as a plain script (not `-m vit_jax.bench`), so the PyTorch process never
  # imports the package and with it JAX; run_path leaves sys.path alone.
  launcher = ("import runpy, sys; sys.argv = [sys.argv[1], '--timm-worker', sys.argv[2]]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
  cmd = [sys.executable, "-c", launcher, str(pathlib.Path(__file__).resolve()), json.dumps(spec)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  log(f"[bench] timm worker: {spec['timm_name'] or spec['model']} {spec['kwargs']} ({', '.join(spec['modes'])})")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"the timm worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if not lines:
    raise RuntimeError(f"the timm worker printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def _import_timm():
  """timm needs torchvision at import; where it is missing, use the CPU stand-in of the project."""
  try:
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001  (missing, or a wheel that does not match torch)
    candidates = [os.environ.get("VIT_JAX_TIMM_SHIM"), REPO_ROOT / "shared" / "tools" / "timm_on_cpu.py",
                  REPO_ROOT.parent / "shared" / "tools" / "timm_on_cpu.py"]
    shim = next((pathlib.Path(c) for c in candidates if c and pathlib.Path(c).is_file()), None)
    if shim is None:
      raise ImportError("timm needs torchvision, which is not installed; install torchvision or set "
                        "VIT_JAX_TIMM_SHIM to the path of timm_on_cpu.py (a torchvision stand-in).")
    sys.path.insert(0, str(shim.parent))
    __import__(shim.stem)
  import timm
  return timm


def timm_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs inside the subprocess: builds the timm model and times eager and torch.compile steps."""
  import torch
  timm = _import_timm()

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(int(spec["threads"]))
  else:
    # JAX's default float32 matmul precision on GPU uses TF32 too.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(spec["seed"])
  bf16 = spec["dtype"] == "bfloat16"

  def autocast():
    if bf16:
      return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def sync():
    if cuda:
      torch.cuda.synchronize()

  name, kwargs = spec["timm_name"], dict(spec["kwargs"])
  if name is None:
    name, extra = timm_model_name(spec["model"], spec["image_size"], timm.is_model)
    kwargs.update(extra)
  h, w = spec["image_size"]
  images = torch.randn(spec["batch"], 3, h, w, device=device)
  labels = torch.randint(0, spec["num_classes"], (spec["batch"],), device=device)
  result = {"timm_name": name, "timm_kwargs": kwargs, "timm_version": timm.__version__,
            "torch_version": torch.__version__, "timm_device": torch.cuda.get_device_name() if cuda else "cpu",
            "timm_threads": torch.get_num_threads()}
  for variant in spec["modes"]:
    try:
      result.update(_time_timm_variant(timm, name, kwargs, variant, spec, images, labels, device, autocast, sync))
    except Exception as e:  # noqa: BLE001  (e.g. torch.compile or out of memory: report, keep the rest)
      result[f"timm_{variant}_error"] = f"{type(e).__name__}: {e}"[:1000]
    if cuda:
      torch.cuda.empty_cache()
  return result


def _time_timm_variant(timm, name, kwargs, variant, spec, images, labels, device, autocast, sync):
  """Median step time of one timm variant ('eager' or 'compile') on fixed device inputs."""
  import torch
  import torch.nn.functional as F
  cuda = device.type == "cuda"
  result = {}
  model = timm.create_model(name, pretrained=False, num_classes=spec["num_classes"], **kwargs).to(device)
  if spec["mode"] == "train":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **({"fused": True} if cuda else {}))
  else:
    model.eval()
  fn = torch.compile(model) if variant == "compile" else model

  def step():
    if spec["mode"] == "train":
      with autocast():
        loss = F.cross_entropy(fn(images).float(), labels)
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    else:
      with torch.inference_mode(), autocast():
        fn(images)

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step()  # first call: torch.compile compiles here
  sync()
  first_s = time.perf_counter() - start
  for _ in range(spec["warmup"]):
    step()
  sync()
  times = []
  for _ in range(spec["steps"]):
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  result[f"timm_{variant}_step_ms"] = round(1e3 * median, 3)
  result[f"timm_{variant}_img_per_sec"] = round(spec["batch"] / median, 3)
  result[f"timm_{variant}_first_step_s"] = round(first_s, 3)
  result[f"timm_{variant}_peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
  return result


# ------------------------------------------------------------------------------ the commands


def bench_one(args: argparse.Namespace) -> dict[str, Any]:
  """One configuration: optional timm subprocess first, then the JAX measurement."""
  import jax  # no backend is touched until device_info / the model runs

  model = build_model(args)
  flop_per_image, flop_note = analytic_flops(model, args.mode)
  timm_result = None
  if args.vs == "timm":
    # A model that cannot run (e.g. a bad image size) fails here, not after the timm run.
    h, w = image_hw(model)
    jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, h, w, 3)), train=False))
    # Before JAX claims the accelerator: the two frameworks never share device memory.
    timm_result = run_timm_subprocess(timm_spec(model, args, args.batch))

  info = device_info()
  log(f"[bench] {args.model} {args.mode} batch={args.batch} on {info['device']} ...")
  measured = run_jax(model, args, args.batch)
  peak = args.peak_tflops or _table_peak(info["device"])
  record: dict[str, Any] = {
      "model": args.model, "mode": args.mode, "batch": args.batch, "image_size": list(image_hw(model)),
      "dtype": args.dtype, "attention": args.attention, "remat": args.remat, "scan": args.scan,
      "overrides": parse_overrides(args.overrides) or None, "steps": args.steps, **info,
      "threads": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), **measured,
      "gflops_per_image": None if flop_per_image is None else round(flop_per_image / 1e9, 4),
      "tflops_per_sec": None, "peak_tflops": peak, "mfu": None,
  }
  if flop_per_image is not None:
    tflops = flop_per_image * measured["img_per_sec"] / 1e12
    record["tflops_per_sec"] = round(tflops, 4)
    record["mfu"] = None if not peak else round(tflops / peak, 4)
  else:
    record["flops_note"] = flop_note
  if timm_result is not None:
    record.update(timm_result)
    for variant in ("eager", "compile"):
      theirs = timm_result.get(f"timm_{variant}_img_per_sec")
      record[f"vs_timm_{variant}"] = round(measured["img_per_sec"] / theirs, 3) if theirs else None
  return record


def _table_peak(device_kind: str) -> float | None:
  from vit_jax import flops
  return flops.peak_tflops(device_kind)


def find_max_batch(args: argparse.Namespace) -> dict[str, Any]:
  """Largest batch whose step compiles and runs: doubling from --batch, then bisection."""
  import jax

  model = build_model(args)
  trials = []

  def fits(batch: int) -> bool:
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
          "first_oom_batch": bad, "hit_limit": bad is None, "image_size": list(image_hw(model)),
          "dtype": args.dtype, "remat": args.remat, "scan": args.scan, "trials": trials, **device_info()}


def args_to_argv(entry: dict[str, Any]) -> list[str]:
  """A sweep entry {"model": ..., "mode": ..., "remat": true, "set": [...]} -> command-line flags."""
  argv = []
  for key, value in entry.items():
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
      if value:
        argv.append(flag)
    elif isinstance(value, list):
      for item in value:
        argv += [flag, str(item)]
    elif value is not None:
      argv += [flag, str(value)]
  return argv


def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
  """Each configuration in a fresh process (clean device memory and compile caches)."""
  path = pathlib.Path(args.sweep)
  entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
  shared = _strip_flag(argv, "--sweep")
  failures = 0
  for i, entry in enumerate(entries):
    cmd = [sys.executable, "-m", "vit_jax.bench", *shared, *args_to_argv(entry)]
    log(f"[bench] sweep {i + 1}/{len(entries)}: {' '.join(cmd[3:])}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
      failures += 1
      record = {**entry, "error": f"exit {proc.returncode} (see stderr above)"}
      _emit(record, None)  # the child already appended its successes to --out
      if args.out:
        _emit(record, args.out, echo=False)
    else:
      sys.stdout.write(proc.stdout)
      sys.stdout.flush()
  return 1 if failures else 0


def _strip_flag(argv: list[str], flag: str) -> list[str]:
  out, skip = [], False
  for i, item in enumerate(argv):
    if skip:
      skip = False
      continue
    if item == flag:
      # `--sweep` takes an optional value.
      skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
      continue
    if item.startswith(flag + "="):
      continue
    out.append(item)
  return out


def _emit(record: dict[str, Any], out: str | None, echo: bool = True) -> None:
  line = json.dumps(record)
  if echo:
    print(line, flush=True)
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
      f.write(line + "\n")


TABLE_COLUMNS = (("model", "model"), ("mode", "mode"), ("batch", "batch"), ("image_size", "px"),
                 ("dtype", "dtype"), ("device", "device"), ("img_per_sec", "img/s"), ("step_ms", "step ms"),
                 ("compile_s", "compile s"), ("mfu", "MFU"), ("timm_eager_img_per_sec", "timm eager img/s"),
                 ("timm_compile_img_per_sec", "timm compile img/s"), ("vs_timm_eager", "x eager"),
                 ("vs_timm_compile", "x compile"), ("peak_memory_bytes", "peak GiB"))


def markdown_table(paths: list[str]) -> str:
  rows = []
  for path in paths:
    rows += [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.startswith("{")]

  def cell(row, key):
    value = row.get(key)
    if value is None:
      return "-"
    if key == "image_size":
      return str(value[0])
    if key == "peak_memory_bytes":
      return f"{value / 2**30:.1f}"
    if key == "mfu":
      return f"{100 * value:.1f}%"
    if key == "remat":
      return "yes" if value else ""
    if isinstance(value, float):
      return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)

  header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
  lines = [header, "|" + "---|" * len(TABLE_COLUMNS)]
  for row in rows:
    if "img_per_sec" in row:
      name = row["model"] + (" (remat)" if row.get("remat") else "") + (" (scan)" if row.get("scan") else "")
      lines.append("| " + " | ".join(name if k == "model" else cell(row, k) for k, _ in TABLE_COLUMNS) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.timm_worker is not None:
    print(json.dumps(timm_worker(json.loads(args.timm_worker))), flush=True)
    return 0
  if args.table:
    print(markdown_table(args.table))
    return 0
  if args.sweep:
    return run_sweep(args, argv)
  if gpu_present() and not args.no_gpu_defaults:
    log(f"[bench] GPU defaults: {apply_gpu_defaults()}")
  record = find_max_batch(args) if args.find_max_batch else bench_one(args)
  record["command"] = "python -m vit_jax.bench " + " ".join(argv)
  _emit(record, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
