"""Times a timm/PyTorch model (eager and torch.compile): the PyTorch side of `python -m vit_jax.bench --vs timm`.

  python benchmarks/timm_bench.py '{"timm_name": "vit_small_patch16_224", "image_size": [224, 224],
                                    "mode": "train", "batch": 8, "dtype": "float32", "modes": ["eager"]}'

Prints one JSON line: timm_name (the model created), timm_kwargs, versions, and per variant
(`eager`, `compile`) timm_<variant>_step_ms, _img_per_sec, _first_step_s, _peak_memory_bytes, or
timm_<variant>_error when that variant fails (the others still run).

The spec (JSON) keys, defaults in SPEC_DEFAULTS: timm_name (timm's architecture at its native resolution;
the size-specific variant such as vit_base_patch16_384 is used when timm has one for image_size, unless
kwargs set img_size), image_size [h, w], kwargs (more timm.create_model arguments), num_classes, batch,
dtype (bfloat16: torch.autocast), mode (train: AdamW step; infer: inference_mode forward), steps (timed,
median reported), warmup, modes, threads (CPU), seed.

This script imports torch and timm only, never vit_jax (and with it JAX), so `vit_jax.bench` runs it in a
subprocess before JAX claims the accelerator. timm needs torchvision to import; where torch, timm or
torchvision is missing the script prints one line saying what to install and exits with EXIT_UNAVAILABLE.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

EXIT_UNAVAILABLE = 3

SPEC_DEFAULTS = {"kwargs": {}, "num_classes": 1000, "batch": 32, "dtype": "float32", "mode": "infer",
                 "steps": 20, "warmup": 2, "modes": ["eager", "compile"], "threads": None, "seed": 0}


class Unavailable(Exception):
  """torch, timm or torchvision cannot be imported (the message says what to install)."""


def import_timm():
  """timm, or Unavailable with a one-line message naming the package to install."""
  try:
    import torch
  except ImportError as e:
    raise Unavailable(f"--vs timm needs PyTorch, which is not installed ({e}): pip install torch") from None
  try:
    import torchvision  # noqa: F401  (timm imports it at load time)
  except Exception as e:  # noqa: BLE001  (missing, or a wheel built for another torch)
    why = ("is not installed" if isinstance(e, ModuleNotFoundError)
           else f"does not import ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    raise Unavailable(f"--vs timm: timm needs torchvision, which {why}: pip install torchvision "
                      f"(the build that matches torch {torch.__version__})") from None
  try:
    import timm
  except ImportError as e:
    raise Unavailable(f"--vs timm needs timm, which does not import ({e}): pip install timm") from None
  return timm


def timm_model_name(name: str, image_size, is_model) -> str:
  """timm's size-specific variant of the native `name` for `image_size` (e.g. vit_base_patch16_384,
  maxvit_tiny_tf_512) when `is_model` (timm.is_model) knows it, else `name` itself."""
  h, w = image_size
  base, _, native = name.rpartition("_")
  if native.isdigit() and h == w and h != int(native) and is_model(f"{base}_{h}"):
    return f"{base}_{h}"
  return name


def resolve(spec: dict[str, Any], is_model) -> tuple[str, dict[str, Any]]:
  """The timm name and create_model kwargs for `spec` at its image size."""
  name, kwargs = spec["timm_name"], dict(spec["kwargs"])
  if "img_size" not in kwargs:
    name = timm_model_name(name, spec["image_size"], is_model)
    native = name.rpartition("_")[2]
    h, w = spec["image_size"]
    if not (native.isdigit() and (h, w) == (int(native), int(native))):
      kwargs["img_size"] = h if h == w else (h, w)
  return name, kwargs


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  """Builds the timm model and times each variant of spec['modes'] on fixed device inputs."""
  spec = {**SPEC_DEFAULTS, **spec}
  timm = import_timm()
  import torch

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(int(spec["threads"] or os.cpu_count()))
  else:
    # JAX's default float32 matmul precision on GPU uses TF32 too.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(spec["seed"])

  name, kwargs = resolve(spec, timm.is_model)
  h, w = spec["image_size"]
  images = torch.randn(spec["batch"], 3, h, w, device=device)
  labels = torch.randint(0, spec["num_classes"], (spec["batch"],), device=device)
  result = {"timm_name": name, "timm_kwargs": kwargs, "timm_version": timm.__version__,
            "torch_version": torch.__version__, "timm_device": torch.cuda.get_device_name() if cuda else "cpu",
            "timm_threads": torch.get_num_threads()}
  for variant in spec["modes"]:
    try:
      result.update(_time_variant(timm, name, kwargs, variant, spec, images, labels, device))
    except Exception as e:  # noqa: BLE001  (e.g. torch.compile or out of memory: report, keep the rest)
      result[f"timm_{variant}_error"] = f"{type(e).__name__}: {e}"[:1000]
    if cuda:
      torch.cuda.empty_cache()
  return result


def _time_variant(timm, name, kwargs, variant, spec, images, labels, device) -> dict[str, Any]:
  """Median step time of one variant ('eager' or 'compile')."""
  import torch
  import torch.nn.functional as F

  cuda = device.type == "cuda"
  model = timm.create_model(name, pretrained=False, num_classes=spec["num_classes"], **kwargs).to(device)
  if spec["mode"] == "train":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **({"fused": True} if cuda else {}))
  else:
    model.eval()
  fn = torch.compile(model) if variant == "compile" else model

  def autocast():
    if spec["dtype"] == "bfloat16":
      return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def sync():
    if cuda:
      torch.cuda.synchronize()

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
  return {f"timm_{variant}_step_ms": round(1e3 * median, 3),
          f"timm_{variant}_img_per_sec": round(spec["batch"] / median, 3),
          f"timm_{variant}_first_step_s": round(first_s, 3),
          f"timm_{variant}_peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0] in ("-h", "--help"):
    print(__doc__, file=sys.stderr)
    return 2
  try:
    result = worker(json.loads(argv[0]))
  except Unavailable as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_UNAVAILABLE
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
