"""The benchmark CLI end to end on a tiny ViT (2 steps), its timm path, and the scripts in benchmarks/.

Timings are never asserted: only that every field is there, has the right type,
and that the derived figures (FLOPs, MFU, ratios) are computed from the measured ones.
timm needs torchvision to import; the README's test environment has none, so the timm tests put the
stand-in of tests/stubs on sys.path / PYTHONPATH (fixture `torchvision_stand_in`).
"""
import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from vit_jax import bench, flops
from vit_jax.models import registry

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
STUBS = pathlib.Path(__file__).resolve().parent / "stubs"

TINY_VIT = ["--model", "ViT-Ti_16", "--image-size", "32", "--set", "patch_size=8", "--set", "hidden_size=32",
            "--set", "depth=1", "--set", "num_heads=2", "--set", "mlp_dim=64", "--num-classes", "10",
            "--batch", "2", "--steps", "2", "--warmup", "1"]

FIELDS = {"model": str, "mode": str, "batch": int, "image_size": list, "dtype": str, "backend": str, "device": str,
          "img_per_sec": float, "step_ms": float, "compile_s": float, "gflops_per_image": float,
          "tflops_per_sec": float, "mfu": float, "peak_tflops": float, "xla_memory_bytes": int}


def _script(name):
  """benchmarks/<name>.py as a module (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _with_pythonpath(monkeypatch, *paths):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture
def torchvision_stand_in(monkeypatch):
  """timm imports here (sys.path) and in subprocesses (PYTHONPATH) with the stand-in of tests/stubs."""
  monkeypatch.syspath_prepend(str(STUBS))
  _with_pythonpath(monkeypatch, STUBS)


def _run(capsys, argv):
  assert bench.main(argv) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert len(lines) == 1, lines
  return json.loads(lines[0])


def test_cli_train_end_to_end(capsys, tmp_path):
  out = tmp_path / "results.jsonl"
  record = _run(capsys, TINY_VIT + ["--mode", "train", "--dtype", "float32", "--peak-tflops", "1.5",
                                    "--out", str(out)])
  for key, kind in FIELDS.items():
    assert isinstance(record[key], kind), (key, record[key])
  assert "peak_memory_bytes" in record  # null on CPU, bytes on GPU/TPU
  assert record["mode"] == "train" and record["batch"] == 2 and record["image_size"] == [32, 32]
  assert record["img_per_sec"] > 0 and record["step_ms"] > 0
  assert record["final_loss"] == pytest.approx(record["final_loss"])  # finite, not NaN
  # Analytic FLOPs of the tiny model: forward = 2 x MACs, training x3; MFU against --peak-tflops.
  model = bench.build_model(bench.parse_args(TINY_VIT))
  per_image = 3 * flops.forward_flops(model)
  assert record["gflops_per_image"] == pytest.approx(per_image / 1e9, abs=1e-4)
  assert record["tflops_per_sec"] == pytest.approx(per_image * record["img_per_sec"] / 1e12, rel=1e-3, abs=1e-4)
  assert record["mfu"] == pytest.approx(record["tflops_per_sec"] / 1.5, rel=1e-3, abs=1e-4)
  assert json.loads(out.read_text().splitlines()[-1]) == record


def test_cli_infer_with_timm(capsys, torchvision_stand_in):
  # The timm/PyTorch side runs benchmarks/timm_bench.py in a subprocess.
  record = _run(capsys, TINY_VIT + ["--mode", "infer", "--scan", "--remat", "--vs", "timm", "--timm-modes", "eager"])
  for key, kind in FIELDS.items():
    if key not in ("mfu", "peak_tflops"):
      assert isinstance(record[key], kind), (key, record[key])
  assert record["mode"] == "infer" and record["dtype"] == "bfloat16" and record["scan"] and record["remat"]
  # On CPU there is no peak in the table: no MFU unless --peak-tflops.
  assert record["backend"] == "cpu" and record["peak_tflops"] is None and record["mfu"] is None
  model = bench.build_model(bench.parse_args(TINY_VIT))
  assert record["gflops_per_image"] == pytest.approx(flops.forward_flops(model) / 1e9, abs=1e-4)
  assert record["timm_name"] == "vit_tiny_patch16_224"
  assert record["timm_kwargs"]["embed_dim"] == 32 and record["timm_kwargs"]["img_size"] == 32
  assert record["timm_eager_img_per_sec"] > 0 and record["timm_eager_step_ms"] > 0
  assert record["vs_timm_eager"] == pytest.approx(record["img_per_sec"] / record["timm_eager_img_per_sec"],
                                                  rel=2e-3)
  assert record["vs_timm_compile"] is None  # not requested


def test_vs_timm_without_torchvision_is_a_one_line_error(capsys, monkeypatch, tmp_path):
  # Whatever this machine has installed, torchvision is missing for the timm subprocess here.
  (tmp_path / "torchvision.py").write_text(
      "raise ModuleNotFoundError(\"No module named 'torchvision'\", name='torchvision')\n")
  _with_pythonpath(monkeypatch, tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    bench.main(TINY_VIT + ["--mode", "infer", "--vs", "timm", "--timm-modes", "eager"])
  message = exit_info.value.code
  assert isinstance(message, str) and "\n" not in message, message
  assert message.startswith("python -m vit_jax.bench: error:")
  assert "timm needs torchvision" in message and "pip install torchvision" in message
  assert capsys.readouterr().out == ""  # nothing measured, nothing printed


def test_train_step_carries_batch_stats():
  # MaxViT's BatchNorm statistics go through the training code's step as state; lowering (tracing only)
  # checks the plumbing.
  import jax
  import jax.numpy as jnp
  args = bench.parse_args(["--model", "MaxViT-T", "--image-size", "64", "--set", "window_size=2",
                           "--set", "depths=(1, 1)", "--set", "embed_dims=(32, 64)", "--set", "stem_width=16",
                           "--num-classes", "10", "--dtype", "float32"])
  model = bench.build_model(args)
  state, step = bench.train_step_and_state(model, 0, abstract=True)
  assert jax.tree.leaves(state.batch_stats)
  batch = {"image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
  new_state, metrics = step.lower(state, batch).out_info
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics["train_loss"].shape == ()


def test_timm_spec_matches_the_architecture():
  args = bench.parse_args(TINY_VIT + ["--set", "classifier=gap", "--set", "drop_path_rate=0.1"])
  spec = bench.timm_spec(bench.build_model(args), args, 4)
  assert spec["timm_name"] == "vit_tiny_patch16_224"
  assert spec["kwargs"] == dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                class_token=False, global_pool="avg", drop_path_rate=0.1)
  assert spec["batch"] == 4 and spec["image_size"] == [32, 32] and spec["num_classes"] == 10
  # Registered models keep their regularisation in timm too (ViT-L/16: dropout 0.1).
  args = bench.parse_args(["--model", "ViT-L_16"])
  spec = bench.timm_spec(bench.build_model(args), args, 4)
  assert spec["kwargs"]["proj_drop_rate"] == spec["kwargs"]["pos_drop_rate"] == 0.1
  # Other families: the registry's native timm name; timm_bench.py picks the size variant.
  args = bench.parse_args(["--model", "MaxViT-T", "--image-size", "384"])
  spec = bench.timm_spec(bench.build_model(args), args, 4)
  assert spec["timm_name"] == "maxvit_tiny_tf_224" and spec["kwargs"] == {"drop_path_rate": 0.2}
  assert spec["image_size"] == [384, 384]
  # Other families take no architecture overrides in timm: a clear error.
  args = bench.parse_args(["--model", "MaxViT-T", "--set", "depths=(1, 1)", "--set", "embed_dims=(32, 64)",
                           "--vs", "timm"])
  with pytest.raises(ValueError, match=r"take no architecture options; \[.depths., .embed_dims.\] cannot"):
    bench.timm_spec(bench.build_model(args), args, 4)
  # A model timm does not have.
  args = bench.parse_args(["--model", "R26+ViT-B_32", "--vs", "timm"])
  with pytest.raises(ValueError, match="no counterpart"):
    bench.timm_spec(bench.build_model(args), args, 4)


def test_timm_names_exist(torchvision_stand_in):
  import vit_jax
  timm_bench = _script("timm_bench")
  timm = timm_bench.import_timm()
  names = {model: registry.timm_name(model) for model in vit_jax.list_models()}
  assert sum(name is not None for name in names.values()) >= 27  # every family has its timm names
  for name in filter(None, names.values()):
    assert timm.is_model(name), name

  def resolved(model, size):
    return timm_bench.resolve({"timm_name": names[model], "image_size": size, "kwargs": {}}, timm.is_model)

  assert resolved("ViT-B_16", (224, 224)) == ("vit_base_patch16_224", {})
  assert resolved("ViT-B_16", (384, 384)) == ("vit_base_patch16_384", {})
  assert resolved("MaxViT-T", (512, 512)) == ("maxvit_tiny_tf_512", {})
  assert resolved("CrossViT-15-dagger", (408, 408)) == ("crossvit_15_dagger_408", {})
  assert resolved("ViT-S_16", (256, 256)) == ("vit_small_patch16_224", {"img_size": 256})
  assert resolved("MaxViT-T", (448, 320)) == ("maxvit_tiny_tf_224", {"img_size": (448, 320)})
  # An explicit img_size (the full plain-ViT architecture) keeps the native name.
  spec = {"timm_name": "vit_base_patch16_224", "image_size": (384, 384), "kwargs": {"img_size": 384}}
  assert timm_bench.resolve(spec, timm.is_model) == ("vit_base_patch16_224", {"img_size": 384})


def test_timm_worker_reports_a_failing_variant_and_keeps_going(torchvision_stand_in):
  # In-process here; `--vs timm` runs the same script in a subprocess.
  timm_bench = _script("timm_bench")
  spec = {"timm_name": "vit_tiny_patch16_224", "num_classes": 10, "batch": 2,
          "image_size": [32, 32], "dtype": "float32", "mode": "infer", "steps": 1, "warmup": 0,
          "modes": ["eager"], "threads": 1, "seed": 0,
          "kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, no_such_option=1)}
  result = timm_bench.worker(spec)
  assert "no_such_option" in result["timm_eager_error"] and "timm_eager_img_per_sec" not in result
  del spec["kwargs"]["no_such_option"]
  result = timm_bench.worker(spec)
  assert result["timm_eager_img_per_sec"] > 0 and "timm_eager_error" not in result


def test_standalone_scripts_do_not_import_the_package():
  # timm_bench.py and table.py run without vit_jax (and JAX); sweep.py starts `python -m vit_jax.bench` runs.
  for name in ("timm_bench", "table"):
    tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(module.split(".")[0] in ("vit_jax", "jax", "flax") for module in imported), (name, imported)


def test_find_max_batch_bisects_to_the_largest_fitting_batch(capsys, monkeypatch):
  # On CPU nothing runs out of memory: simulate a device that fits at most 100 images.
  calls = []

  def fake_run(model, args, batch):
    calls.append(batch)
    if batch > 100:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
    return {}

  monkeypatch.setattr(bench, "run_jax", fake_run)
  record = _run(capsys, TINY_VIT + ["--find-max-batch", "--batch", "8", "--batch-multiple", "8"])
  assert record["max_batch"] == 96 and record["first_oom_batch"] == 104
  assert calls == [8, 16, 32, 64, 128, 96, 112, 104]
  assert not record["hit_limit"]


def test_find_max_batch_stops_at_the_limit_and_reraises_other_errors(capsys, monkeypatch):
  monkeypatch.setattr(bench, "run_jax", lambda model, args, batch: {})
  record = _run(capsys, TINY_VIT + ["--find-max-batch", "--batch", "8", "--max-batch", "40"])
  assert record["max_batch"] == 32 and record["hit_limit"]

  def broken(model, args, batch):
    raise ValueError("not a memory problem")

  monkeypatch.setattr(bench, "run_jax", broken)
  with pytest.raises(ValueError, match="not a memory problem"):
    bench.main(TINY_VIT + ["--find-max-batch"])


def test_sweep_file_entries_are_valid_configurations():
  import vit_jax
  sweep = _script("sweep")
  entries = sweep.read_configs(sweep.DEFAULT_CONFIGS)
  assert entries
  for entry in entries:
    args = bench.parse_args(sweep.args_to_argv(entry))
    assert args.model in vit_jax.list_models()
    bench.build_model(args)  # every option exists for that model


def test_sweep_commands(capsys, tmp_path):
  sweep = _script("sweep")
  assert sweep.args_to_argv({"model": "ViT-B_16", "remat": True, "scan": False, "set": ["depth=2", "mlp_dim=8"],
                             "batch": 4}) == ["--model", "ViT-B_16", "--remat", "--set", "depth=2",
                                              "--set", "mlp_dim=8", "--batch", "4"]
  configs = tmp_path / "configs.jsonl"
  configs.write_text('# a comment\n{"model": "ViT-S_16", "mode": "infer"}\n\n{"model": "ViT-B_16", "remat": true}\n')
  assert sweep.main(["--configs", str(configs), "--dry-run", "--vs", "timm", "--out", "r.jsonl"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == ["python -m vit_jax.bench --vs timm --out r.jsonl --model ViT-S_16 --mode infer",
                   "python -m vit_jax.bench --vs timm --out r.jsonl --model ViT-B_16 --remat"]


def test_sweep_runs_each_configuration_and_records_failures(tmp_path):
  # One tiny configuration that runs and one that fails, each in its own `python -m vit_jax.bench`.
  configs = tmp_path / "configs.jsonl"
  tiny = {"model": "ViT-Ti_16", "image_size": 32, "num_classes": 10, "batch": 2, "steps": 1, "warmup": 0,
          "set": ["patch_size=8", "hidden_size=32", "depth=1", "num_heads=2", "mlp_dim=64"]}
  configs.write_text(json.dumps(tiny) + "\n" + json.dumps({"model": "ViT-B_99"}) + "\n")
  out = tmp_path / "results.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, str(BENCHMARKS / "sweep.py"), "--configs", str(configs), "--mode", "infer",
                         "--dtype", "float32", "--out", str(out)], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=300)
  assert proc.returncode == 1, proc.stderr
  printed = [json.loads(line) for line in proc.stdout.splitlines()]
  assert printed == [json.loads(line) for line in out.read_text().splitlines()]
  ok, failed = printed
  assert ok["model"] == "ViT-Ti_16" and ok["mode"] == "infer" and ok["dtype"] == "float32" and ok["img_per_sec"] > 0
  assert failed == {"model": "ViT-B_99", "error": "exit 1 (see stderr above)"}
  assert "Unknown model 'ViT-B_99'" in proc.stderr


def test_markdown_table_of_committed_results(capsys):
  table = _script("table")
  assert table.main([str(BENCHMARKS / "results" / "cpu.jsonl")]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("| model | mode | batch |")
  rows = [line for line in lines[2:] if line.startswith("| ")]
  results = (BENCHMARKS / "results" / "cpu.jsonl").read_text().splitlines()
  assert len(rows) == len(results) >= 2 and all(row.startswith("| ViT-S_16 | ") for row in rows)


def test_markdown_table_of_the_pod_compiles(capsys):
  """One row per `vit_jax.aot` line; a row the compiler refused says what it needed, with no estimate."""
  table = _script("table")
  path = BENCHMARKS / "results" / "tpu_aot.jsonl"
  assert table.main([str(path)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("| model | params | pod | mesh (data×fsdp×tensor) |")
  rows = [line.split(" | ") for line in lines[2:]]
  results = table.aot_order([json.loads(line) for line in path.read_text().splitlines()])
  assert len(rows) == len(results) >= 10
  for cells, result in zip(rows, results):
    assert cells[0] == "| " + result["model"] and cells[2].startswith(result["topology"])
    assert cells[8] == ("yes" if result["memory"]["fits"] else "**no**")
    if "estimate" in result:  # from perfect overlap (the roofline bound) to none (the sum of the three times)
      e = result["estimate"]
      assert cells[10] == (f"{e['step_s'] * 1e3:.0f}–{(e['compute_s'] + e['hbm_s'] + e['ici_s']) * 1e3:.0f} ms "
                           f"({e['bound']})")
    else:
      assert cells[7].startswith("> ") and cells[10] == "—"


def test_malformed_set_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(TINY_VIT + ["--set", "hidden_size"])
  assert exit_info.value.code == 2
  assert "--set expects KEY=VALUE (e.g. --set hidden_size=64), got 'hidden_size'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (TINY_VIT + ["--set", "no_such_field=1"], "Unknown option"),
    (["--model", "CrossViT-S", "--scan"], "--scan is not available for CrossViT-S"),
    (["--model", "ViT-B_99"], "Unknown model"),
])
def test_bad_input_is_a_clear_error(argv, message):
  with pytest.raises((ValueError, TypeError), match=message):
    bench.main(argv)


def test_repeat_interleaves_timm_and_ours_and_reports_medians(capsys, monkeypatch):
  calls = []
  ours, theirs = iter([30.0, 10.0, 20.0]), iter([5.0, 7.0, 6.0])

  def fake_jax(model, args, batch):
    calls.append("jax")
    return {"compile_s": 1.0, "step_ms": next(ours), "xla_memory_bytes": 123}

  def fake_timm(spec, timeout=None):
    calls.append("timm")
    return {"timm_name": spec["timm_name"], "timm_eager_step_ms": next(theirs)}

  monkeypatch.setattr(bench, "run_jax", fake_jax)
  monkeypatch.setattr(bench, "run_timm", fake_timm)
  record = _run(capsys, TINY_VIT + ["--vs", "timm", "--timm-modes", "eager", "--repeat", "3"])
  assert calls == ["timm", "jax"] * 3
  assert record["step_ms"] == 20.0 and record["img_per_sec"] == 100.0  # batch 2 / 20 ms
  assert record["timm_eager_step_ms"] == 6.0 and record["vs_timm_eager"] == pytest.approx(0.3, abs=1e-3)
  assert [r["step_ms"] for r in record["rounds"]] == [30.0, 10.0, 20.0]
  assert [r["timm_eager_step_ms"] for r in record["rounds"]] == [5.0, 7.0, 6.0]
  assert record["xla_memory_bytes"] == 123 and record["repeat"] == 3


def test_compile_only_allocates_nothing_and_reports_memory(capsys):
  small = _run(capsys, TINY_VIT + ["--mode", "infer", "--compile-only"])
  big = _run(capsys, [a if a != "2" else "64" for a in TINY_VIT] + ["--mode", "infer", "--compile-only"])
  for record in (small, big):
    assert record["compile_only"] and record["compile_s"] > 0 and "step_ms" not in record
  assert big["batch"] == 64 and big["xla_temp_bytes"] > small["xla_temp_bytes"] > 0


def test_find_max_batch_against_a_memory_budget_compiles_only(capsys, monkeypatch):
  monkeypatch.setattr(bench, "run_jax", lambda *a: pytest.fail("--memory-budget-gb must not run the step"))
  needed = lambda model, mode, batch, seed=0: {"xla_memory_bytes": batch * 2 ** 20}  # 1 MiB per image
  monkeypatch.setattr(bench, "compile_only", needed)
  record = _run(capsys, TINY_VIT + ["--find-max-batch", "--memory-budget-gb", str(100 / 1024), "--batch", "8"])
  assert record["max_batch"] == 96 and record["memory_budget_gb"] == pytest.approx(100 / 1024)
  assert [t[:2] for t in record["trials"]][:5] == [[8, True], [16, True], [32, True], [64, True], [128, False]]
