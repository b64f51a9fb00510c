r"""The train step of a run, compiled ahead of time for a TPU pod that is not attached (libtpu needed).

  python -m vit_jax.aot --config=configs/vit_pretrain.py:recipe=i21k,model=ViT-B_16 --topology=v5e:16x16 \
      [--config.KEY=VALUE ...] [--json OUT.jsonl] [--search_mesh] [--find_max_batch]

`jax.experimental.topologies.get_topology_desc(topology, "tpu")` describes the pod's devices on this
machine; the run's train step (`trainer.plan` + `trainer.make_train_step`: the model, optimiser, mesh of
`config.mesh`, shardings, accumulation, dtype and remat/scan of `vit_jax.main`) is lowered on the abstract
state and batch (jax.ShapeDtypeStruct with shardings: no parameter materialised, no data read) and compiled
by the TPU compiler.  Reported per device:

  memory       arguments, outputs, donated, temporaries, generated code (+ the batches prefetched ahead of
               the step), the total against the chip's HBM: FITS / DOES NOT FIT
  FLOPs        the compiler's (`cost_analysis`, which counts every loop body once) and the matmul FLOPs of the
               optimised HLO with every while loop multiplied by its trip count (`vit_jax.hlo_stats`),
               against `vit_jax.flops` (3 x forward matmul FLOPs per image)
  collectives  all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute of the optimised HLO:
               count and bytes, inside and outside the loops (the layer loop under scan)
  ESTIMATES    a roofline: step time = max(matmul FLOPs / bf16 peak, HBM bytes / HBM bandwidth,
               collective bytes / ICI bandwidth), from which img/s per chip, the pod's img/s and MFU.
               Not a measurement: it assumes perfect overlap and peak rates.

The figures of each chip (`CHIPS`) are the vendors' data sheets (HBM, peak) and the scaling book's ICI
link bandwidths.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import os
import re
import contextlib
import sys
import threading
import time
from typing import Any

# Another process (any JAX program on this machine, with libtpu installed) may hold libtpu's lock file;
# compiling for a topology needs no exclusive access to a chip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only the compile target: no chip is looked for

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:ARGS]).", lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:16x16, v5p:4x4x8, v6e:16x16, v5e:2x2.")
flags.DEFINE_string("json", None, "Append one JSON line per compiled step to this file.")
flags.DEFINE_string("save_hlo", None, "Write each compiled step's optimised HLO (gzipped text) into this folder, "
                    "so that its figures can be read again (vit_jax.hlo_stats) without compiling.")
flags.DEFINE_bool("search_mesh", False, "Compile every (data, fsdp, tensor) factorisation of the device count "
                  "that divides the model and the batch; print them sorted by estimated step time.")
flags.DEFINE_integer("search_max_tensor", None, "With --search_mesh: only meshes whose tensor axis is at most "
                     "this (1: data x fsdp only; each candidate is a compile of minutes for a large model).")
flags.DEFINE_bool("find_max_batch", False, "Bisect the largest global batch whose compiled step fits the HBM.")
# The spellings of the issue and of our other commands (`bench --find-max-batch`).
flags.DEFINE_alias("search-mesh", "search_mesh")
flags.DEFINE_alias("find-max-batch", "find_max_batch")
flags.DEFINE_float("hbm_gib", None, "Per-chip memory to check against (GiB); default: the chip's HBM.")
flags.DEFINE_integer("num_classes", None, "Class count when config.num_classes is -1 (default: known data sets).")
flags.DEFINE_integer("train_examples", None, "Training-split size (for durations in epochs; default: known sets).")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: HBM (GiB), HBM bandwidth (B/s), ICI bandwidth of one link, one way (B/s), torus dims.

  The bf16 peak is `vit_jax.flops.PEAK_TFLOPS` (one table of peaks for the whole project)."""
  name: str
  device_kind: str
  hbm_gib: float
  hbm_bandwidth: float
  ici_link_bandwidth: float

  @property
  def peak_flops(self) -> float:
    from vit_jax import flops
    return flops.peak_tflops(self.device_kind) * 1e12


# HBM and bandwidth: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; ICI one-way per link: the scaling book (tpus.md).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32, 1.2e12, 4.5e10),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 8.2e11, 4.5e10),
    "v5p": Chip("v5p", "TPU v5", 95, 2.76e12, 9e10),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 1.64e12, 9e10),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v4p": "v4"}
TOPOLOGY_FORMS = ("v5e:16x16 (v5e-256)", "v5p:4x4x8 (v5p-128: 128 chips)", "v6e:16x16",
                  "v4:4x4x4 (v4-128: 64 megacore chips)", "v5e:2x2 (4 chips, e.g. for tests)")
# imagenet21k: the head of the official ViT i21k checkpoints (21,843 classes; our builder's fall11 has 21,841:
# --num_classes=21841 for that exactly) and the fall11 images minus the 51,200 held out by vit_pretrain.py.
KNOWN_DATASETS = {"imagenet21k": (21843, 14_197_122 - 51_200), "imagenet2012": (1000, 1_281_167),
                  "cifar10": (10, 50_000), "cifar100": (100, 50_000)}  # (classes, training examples)


def _print(*args):
  print(*args, flush=True)


@contextlib.contextmanager
def _heartbeat(what: str, every_s: float = 60.0):
  """Says every `every_s` seconds that `what` is still running (a pod compile takes minutes on 2 cores)."""
  done = threading.Event()
  t0 = time.time()

  def beat():
    while not done.wait(every_s):
      _print(f"  ... {what}: {time.time() - t0:.0f} s")
  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


# Depth from which an unscanned model is worth a warning: the compiler then sees every layer (the CPU train
# step compiled in 8.7 s at depth 24 and 17.6 s at depth 48 unrolled, 3.0 and 2.6 s scanned).
SCAN_ADVICE_DEPTH = 24


def check_libtpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("libtpu is not installed, and compiling for a TPU topology needs it: "
                     'pip install -e ".[tpu]" (or pip install "jax[tpu]" at your jax version).')


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as 'v5e:16x16'; raises listing the accepted forms."""
  m = re.fullmatch(r"([a-z0-9]+)[:=_]([0-9]+(?:x[0-9]+){1,2})", topology.strip().lower())
  name = ALIASES.get(m.group(1), m.group(1)) if m else None
  if name not in CHIPS:
    raise ValueError(f"unknown TPU topology {topology!r}: give CHIP:AxB or CHIP:AxBxC with CHIP one of "
                     f"{sorted(CHIPS)}, e.g. {', '.join(TOPOLOGY_FORMS)}.")
  return CHIPS[name]


def topology_devices(topology: str):
  from jax.experimental import topologies
  chip = chip_of(topology)
  check_libtpu()
  head, dims = re.split(r"[:=_]", topology.strip().lower(), maxsplit=1)
  name = f"{ALIASES.get(head, head)}:{dims}"
  try:
    devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    if any(getattr(d, "core_on_chip", 0) for d in devices):
      # libtpu describes v4 per TensorCore by default (v4:4x4x4 -> 128 devices); a v4 pod runs one device per chip
      # (megacore: both cores one device, as jax.devices() shows there), and jax meshes on TPU > v3 require that.
      devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                  chip_config_name="megacore").devices)
  except Exception as e:  # libtpu's message names the constraint (e.g. chips per host)
    raise ValueError(f"TPU topology {topology!r} is not accepted by libtpu ({str(e).splitlines()[0]}); "
                     f"accepted forms: {', '.join(TOPOLOGY_FORMS)}.") from None
  if any(getattr(d, "core_on_chip", 0) for d in devices):
    raise ValueError(f"libtpu describes {topology!r} with {len(devices)} devices, several TensorCores per chip, even "
                     "in its megacore mode, and jax meshes on TPU > v3 need one device per chip: try v5p, v5e or v6e.")
  return chip, devices


def dataset_sizes(config, num_classes: int | None = None, train_examples: int | None = None) -> tuple[int, int]:
  """(class count, training examples): given, else config.num_classes and the known data sets' sizes."""
  known = KNOWN_DATASETS.get(config.dataset)
  num_classes = num_classes or (config.num_classes if config.num_classes > 0 else None) or \
      (known[0] if known else None)
  if not num_classes:
    raise ValueError(f"the class count of data set {config.dataset!r} is unknown here: pass --num_classes=N "
                     "(or --config.num_classes=N).")
  train_examples = train_examples or (known[1] if known else 1_000_000)
  return int(num_classes), int(train_examples)


def check_mesh(config, model, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of config.mesh on `num_devices`; raises for a mesh the model or pod cannot take."""
  from vit_jax.train import sharding as shd
  sizes = shd.mesh_shape(config.mesh.to_dict(), num_devices)
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(shd.MESH_AXES, sizes))} has {math.prod(sizes)} devices but the topology "
                     f"has {num_devices}: the product of data x fsdp x tensor must equal it (use -1 on one axis).")
  tensor = sizes[2]
  for what in ("num_heads", "mlp_dim"):
    value = getattr(model, what, None)
    if tensor > 1 and value and value % tensor:
      raise ValueError(f"{what}={value} of {config.model.name} is not divisible by the tensor axis ({tensor}): "
                       f"choose mesh.tensor among the divisors of {value}.")
  dp = sizes[0] * sizes[1]
  if config.batch_size % dp:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the data-parallel size data x fsdp = "
                     f"{dp}; use e.g. batch_size={max(dp, config.batch_size // dp * dp)}.")
  return sizes


def _collective_seconds(summary: list, chip: Chip) -> float:
  """Time of the collectives at the ICI bandwidth of one bidirectional ring (2 links per chip); a collective
  over a 2D/3D group can use more links: this is the pessimistic side of the estimate."""
  bandwidth = 2 * chip.ici_link_bandwidth
  total = 0.0
  for c in summary:
    n = max(c.group, 1)
    share = (n - 1) / n
    moved = {"all-gather": c.bytes * share, "reduce-scatter": c.bytes * (n - 1),
             "all-reduce": 2 * c.bytes * share, "all-to-all": c.bytes * share,
             "collective-permute": c.bytes}[c.kind]
    total += c.count * moved / bandwidth
  return total


def analyse(config, topology: str, chip: Chip, devices, *, hbm_gib: float | None = None,
            num_classes: int | None = None, train_examples: int | None = None,
            hlo_dir: str | None = None) -> dict[str, Any]:
  """Compiles the run's train step for `devices` and returns the report (a JSON-able dict)."""
  import jax
  from vit_jax import flops as flops_lib
  from vit_jax import hlo_stats
  from vit_jax.train import config_base, memory, trainer
  from vit_jax.train import sharding as shd

  overrides = config_base.check_model(config)
  num_classes, train_examples = dataset_sizes(config, num_classes, train_examples)
  model = config_base.build_model(config, num_classes, overrides)
  sizes = check_mesh(config, model, len(devices))
  accum = config_base.accum_steps_option(config)
  if accum == "auto":
    raise ValueError("accum_steps='auto' resolves on the attached devices; give accum_steps as a number here "
                     "(--find_max_batch finds the largest batch that fits).")
  mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, sizes)), devices)
  setup = trainer.plan(config, mesh, num_classes, train_examples, overrides=overrides)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
  report = {
      "model": config.model.name, "params": n_params, "topology": topology, "chip": chip.name, "devices": len(devices),
      "mesh": dict(zip(shd.MESH_AXES, sizes)), "batch_size": config.batch_size, "accum_steps": accum,
      "image_size": config.image_size, "dtype": str(config.model.get("dtype", "float32")),
      "remat": bool(config.model.get("remat", False)),
      "remat_policy": config.model.get("remat_policy", "nothing_saveable") if config.model.get("remat") else None,
      "scan": bool(config.model.get("scan", False)),
      "optimizer": config.optimizer, "param_sharding": param_sharding(setup, len(devices)),
  }
  hbm = (hbm_gib or chip.hbm_gib) * GIB
  depth = getattr(model, "depth", 0)
  if depth >= SCAN_ADVICE_DEPTH and not report["scan"]:
    _print(f"note: {config.model.name} has {depth} layers and scan=False: the compiler sees each of them, and "
           "the compile time grows with depth; --config.model.scan=True compiles one layer loop (bounded).")
  t0 = time.time()
  try:
    with _heartbeat(f"compiling {config.model.name} for {topology}"):
      compiled, fp = memory.compile_train_step(config, setup, accum)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler stops when the program cannot fit the chip: that is the answer.
    message = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
    return dict(report, compile_s=round(time.time() - t0, 1), memory={"hbm": int(hbm), "fits": False,
                                                                        "compiler": message.strip()})
  compile_s = time.time() - t0
  hlo_text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    mesh_name = "x".join(str(v) for v in sizes)
    name = (f"{config.model.name}_{topology.replace(':', '-')}_mesh{mesh_name}_batch{config.batch_size}"
            f"_remat-{report['remat_policy'] or 'none'}_{config.optimizer}.hlo.gz")
    with gzip.open(os.path.join(hlo_dir, name), "wt") as f:
      f.write(hlo_text)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  stats = hlo_stats.analyse(hlo_text, len(devices))
  n = len(devices)
  batch = config.batch_size
  analytic = flops_lib.train_flops(setup.model)  # per image
  analytic_per_device = analytic * batch / n
  compute_s = stats.matmul_flops / chip.peak_flops
  memory_s = stats.hbm_bytes / chip.hbm_bandwidth
  comm_s = _collective_seconds(stats.collectives, chip)
  step_s = max(compute_s, memory_s, comm_s)
  bound = ("compute", "HBM", "ICI")[[compute_s, memory_s, comm_s].index(step_s)]
  img_s_chip = batch / step_s / n
  optimal = cost.get("optimal_seconds")
  return {
      **report, "compile_s": round(compile_s, 1),
      "memory": {"arguments": fp.arguments, "outputs": fp.outputs, "donated": fp.aliased,
                 "temporaries": fp.temporaries, "generated_code": fp.code, "prefetched_batches": fp.prefetch,
                 "total": fp.total, "hbm": int(hbm), "fits": fp.total <= hbm},
      "flops": {"cost_analysis": cost.get("flops"), "cost_analysis_bytes_accessed": cost.get("bytes accessed"),
                "cost_analysis_optimal_seconds_unchecked": optimal,
                "hlo_matmul_per_device": stats.matmul_flops, "hlo_matmul_per_device_loops_once": stats.matmul_flops_once,
                "analytic_train_per_image": analytic, "analytic_per_device": analytic_per_device,
                "hlo_over_analytic": stats.matmul_flops / analytic_per_device if analytic_per_device else None,
                "loops": stats.loops},
      "hbm_bytes_per_device_estimate": stats.hbm_bytes,
      # Loop bodies once, as cost_analysis counts its bytes. Not the same quantity: cost_analysis counts every
      # byte accessed, VMEM too (tiny ViT on v5e:2x2: 122 MB there, 0.83 MB of HBM here), so no check of ours.
      "hbm_bytes_per_device_loops_once": stats.hbm_bytes_once,
      "collectives": stats.collective_summary(),
      # step_s: the three overlap perfectly (a bound from below); step_s_serial: none overlaps (from above).
      "estimate": {"compute_s": compute_s, "hbm_s": memory_s, "ici_s": comm_s, "step_s": step_s, "bound": bound,
                   "step_s_serial": compute_s + memory_s + comm_s,
                   "mfu_serial": analytic * batch / n / (compute_s + memory_s + comm_s) / chip.peak_flops,
                   "img_s_per_chip": img_s_chip, "img_s_pod": img_s_chip * n,
                   "mfu": analytic * img_s_chip / chip.peak_flops,
                   "days_90_epochs_i21k": 90 * 14.2e6 / (img_s_chip * n) / 86400},
  }


def param_sharding(setup, num_devices: int) -> dict[str, Any]:
  """Parameter bytes per device against an even split over fsdp x tensor (`data` replicates by design), and
  the largest kernels left replicated (a dim the mesh axis does not divide, e.g. ViT-G's width 1664 on
  fsdp=256, is replicated: sharding.spec_for)."""
  import jax
  import numpy as np
  from vit_jax.train import optim
  total = per_device = 0
  replicated = []
  for (path, x), sharding in zip(jax.tree_util.tree_leaves_with_path(setup.abstract_state.params),
                                 jax.tree.leaves(setup.shardings.params)):
    size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    total += size
    per_device += math.prod(sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    if sharding.is_fully_replicated and len(x.shape) >= 2 and num_devices > 1:  # kernels and embeddings
      replicated.append((optim.param_path(path), tuple(x.shape)))
  mesh = setup.mesh.shape
  big = total / 1000 / np.dtype(np.float32).itemsize  # elements: kernels, not biases or norms
  sharded_axes = mesh["fsdp"] * mesh["tensor"] > 1  # else replication is the plan (data parallelism)
  replicated = [(p, shape) for p, shape in replicated if math.prod(shape) >= big and sharded_axes]
  return {"bytes_per_device": per_device, "bytes_even_split": total // (mesh["fsdp"] * mesh["tensor"]),
          "replicated_large": sorted(replicated, key=lambda r: -math.prod(r[1]))[:5]}


def _gib(x: float) -> str:
  from vit_jax.train import memory
  return memory.size(x)


def describe(r: dict) -> str:
  m = r["memory"]
  ps = r["param_sharding"]
  lines = [
      f"{r['model']} ({r['params']:,} parameters) on {r['topology']} ({r['devices']} x TPU {r['chip']}), mesh "
      + " x ".join(f"{k}={v}" for k, v in r["mesh"].items()) + f", global batch {r['batch_size']}"
      + f" (accum_steps {r['accum_steps']}), {r['dtype']} compute, remat={r.get('remat_policy') or r['remat']}, "
      f"scan={r['scan']}, "
      f"{r['optimizer']}; compiled in {r['compile_s']:.0f} s",
      f"parameters per device: {_gib(ps['bytes_per_device'])} (an even split over fsdp x tensor: "
      f"{_gib(ps['bytes_even_split'])})"
      + (f"; replicated (a dim the mesh axis does not divide): "
         + ", ".join(f"{p} {list(shape)}" for p, shape in ps["replicated_large"]) if ps["replicated_large"] else ""),
  ]
  if "compiler" in m:
    lines.append(f"memory per device: DOES NOT FIT the {_gib(m['hbm'])} of a chip; the TPU compiler stopped: "
                 f"{m['compiler']}")
    return "\n".join(lines)
  f, e = r["flops"], r["estimate"]
  lines += [
      f"memory per device: {_gib(m['total'])} of {_gib(m['hbm'])} -> {'FITS' if m['fits'] else 'DOES NOT FIT'} "
      f"(arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, donated -{_gib(m['donated'])}, "
      f"temporaries {_gib(m['temporaries'])}, generated code {_gib(m['generated_code'])}, prefetched batches "
      f"{_gib(m['prefetched_batches'])})",
      f"FLOPs per device: HLO matmuls {f['hlo_matmul_per_device']:.3e} (loops x trip count; "
      f"{f['hlo_matmul_per_device_loops_once']:.3e} with each loop body once), cost_analysis "
      f"{f['cost_analysis'] or 0:.3e} (loop bodies once), vit_jax.flops {f['analytic_per_device']:.3e} "
      f"({f['analytic_train_per_image'] / 1e9:.1f} GFLOP per image) -> HLO / analytic = {f['hlo_over_analytic']:.3f}"
      + (f"; loops (body, trips): {f['loops']}" if f["loops"] else ""),
      "collectives per step (count, result bytes per device; in a loop):",
  ]
  for kind, c in r["collectives"].items():
    if c["count"]:
      lines.append(f"  {kind:19s} {c['count']:6d}  {_gib(c['bytes']):>11s}   in loops: {c['count_in_loop']:6d}  "
                   f"{_gib(c['bytes_in_loop'])}")
  lines.append(
      f"ESTIMATE (roofline, not a measurement): step {e['step_s'] * 1e3:.3g} ms ({e['bound']}-bound; compute "
      f"{e['compute_s'] * 1e3:.3g} ms at bf16 peak, HBM {e['hbm_s'] * 1e3:.3g} ms, ICI {e['ici_s'] * 1e3:.3g} ms) "
      f"-> {e['img_s_per_chip']:.0f} img/s per chip, {e['img_s_pod']:.0f} img/s for the pod, MFU {e['mfu']:.1%}, "
      f"90 epochs of ImageNet-21k (14.2 M images) in {e['days_90_epochs_i21k']:.2f} days; if nothing overlapped: "
      f"step {e['step_s_serial'] * 1e3:.3g} ms, MFU {e['mfu_serial']:.1%}")
  return "\n".join(lines)


def mesh_candidates(num_devices: int, model, batch_size: int,
                    max_tensor: int | None = None) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) with product num_devices, tensor dividing heads and MLP width (and at most
  `max_tensor`), data x fsdp the batch."""
  out = []
  for tensor in range(1, min(num_devices, max_tensor or num_devices) + 1):
    if num_devices % tensor or (tensor > 1 and (model.num_heads % tensor or model.mlp_dim % tensor)):
      continue
    rest = num_devices // tensor
    for fsdp in range(1, rest + 1):
      if rest % fsdp == 0 and batch_size % rest == 0:
        out.append((rest // fsdp, fsdp, tensor))
  return out


def _emit(report: dict, path: str | None, command: str) -> None:
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(dict(report, command=command), default=str) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}.")
  import jax  # noqa: F401  (after flags: the CPU platform for this process, TPU only as a compile target)
  from vit_jax.train import config_base
  config = FLAGS.config
  command = "python -m vit_jax.aot " + " ".join(sys.argv[1:])
  chip, devices = topology_devices(FLAGS.topology)
  options = dict(hbm_gib=FLAGS.hbm_gib, num_classes=FLAGS.num_classes, train_examples=FLAGS.train_examples,
                 hlo_dir=FLAGS.save_hlo)
  _print(f"{FLAGS.topology}: {len(devices)} x {devices[0].device_kind}; compiling the train step of "
         f"{config.model.name} (this can take minutes on a small CPU)...")
  if FLAGS.search_mesh:
    model = config_base.build_model(config, dataset_sizes(config, FLAGS.num_classes)[0])
    candidates = mesh_candidates(len(devices), model, config.batch_size, FLAGS.search_max_tensor)
    if not candidates:
      raise ValueError(f"no (data, fsdp, tensor) mesh of {len(devices)} devices divides the batch "
                       f"{config.batch_size} (and the heads / MLP width for tensor > 1).")
    _print(f"{len(candidates)} meshes to compile, one after the other.")
    rows = []
    for i, (d, f, t) in enumerate(candidates):
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = d, f, t
      _print(f"[{i + 1}/{len(candidates)}] mesh data={d} fsdp={f} tensor={t} ...")
      try:
        r = analyse(config, FLAGS.topology, chip, devices, **options)
      except Exception as e:  # pylint: disable=broad-except  (one mesh failing to compile: say so, go on)
        _print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        continue
      _emit(r, FLAGS.json, command)
      rows.append(r)
      if "estimate" not in r:
        _print(f"  DOES NOT FIT ({r['memory']['compiler']}), {r['compile_s']:.0f} s")
        continue
      _print(f"  {_gib(r['memory']['total'])} {'fits' if r['memory']['fits'] else 'DOES NOT FIT'}, est. step "
             f"{r['estimate']['step_s'] * 1e3:.3g} ms, compiled in {r['compile_s']:.0f} s")
    rows = [r for r in rows if "estimate" in r]
    rows.sort(key=lambda r: (not r["memory"]["fits"], r["estimate"]["step_s"]))
    _print("\nmeshes by estimated step time (ESTIMATES):\n  data fsdp tensor   memory/chip   fit   est. step   "
           "est. img/s/chip  est. MFU")
    for r in rows:
      m, e = r["mesh"], r["estimate"]
      _print(f"  {m['data']:4d} {m['fsdp']:4d} {m['tensor']:6d}   {_gib(r['memory']['total']):>11s}   "
             f"{'yes' if r['memory']['fits'] else 'NO ':3s}  {e['step_s'] * 1e3:8.3g} ms  {e['img_s_per_chip']:12.0f}"
             f"     {e['mfu']:.1%}")
    return
  if FLAGS.find_max_batch:
    from vit_jax.train import sharding as shd
    sizes = shd.mesh_shape(config.mesh.to_dict(), len(devices))
    dp = sizes[0] * sizes[1]
    lo, hi, best = 0, max(config.batch_size // dp, 1), None  # per data-parallel device: lo fits, hi not
    while True:  # grow until it does not fit
      config.batch_size = hi * dp
      _print(f"batch {config.batch_size} ({hi} per data-parallel device) ...")
      r = analyse(config, FLAGS.topology, chip, devices, **options)
      _emit(r, FLAGS.json, command)
      if not r["memory"]["fits"]:
        break
      best, lo, hi = r, hi, hi * 2
    while hi - lo > 1:
      mid = (lo + hi) // 2
      config.batch_size = mid * dp
      _print(f"batch {config.batch_size} ...")
      r = analyse(config, FLAGS.topology, chip, devices, **options)
      _emit(r, FLAGS.json, command)
      if r["memory"]["fits"]:
        best, lo = r, mid
      else:
        hi = mid
    if best is None:
      _print(f"even a batch of {dp} (1 per data-parallel device) does not fit.")
    else:
      _print(f"largest global batch that fits: {best['batch_size']}\n" + describe(best))
    return
  r = analyse(config, FLAGS.topology, chip, devices, **options)
  _emit(r, FLAGS.json, command)
  _print(describe(r))


def run():
  try:
    app.run(main)
  except ValueError as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  run()
