"""The benchmark CLI end to end on a tiny ViT (2 steps), its timm path, and its helpers.

Timings are never asserted: only that every field is there, has the right type,
and that the derived figures (FLOPs, MFU, ratios) are computed from the measured ones.
"""
import json
import pathlib

import pytest

from vit_jax import bench, flops

TINY_VIT = ["--model", "ViT-Ti_16", "--image-size", "32", "--set", "patch_size=8", "--set", "hidden_size=32",
            "--set", "depth=1", "--set", "num_heads=2", "--set", "mlp_dim=64", "--num-classes", "10",
            "--batch", "2", "--steps", "2", "--warmup", "1"]

FIELDS = {"model": str, "mode": str, "batch": int, "image_size": list, "dtype": str, "backend": str, "device": str,
          "img_per_sec": float, "step_ms": float, "compile_s": float, "gflops_per_image": float,
          "tflops_per_sec": float, "mfu": float, "peak_tflops": float, "xla_memory_bytes": int}


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


def test_cli_infer_with_timm(capsys):
  # The timm/PyTorch side runs in a subprocess (with the torchvision stand-in where torchvision is missing).
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
  assert record["timm_eager_img_per_sec"] > 0 and record["timm_eager_step_ms"] > 0
  assert record["vs_timm_eager"] == pytest.approx(record["img_per_sec"] / record["timm_eager_img_per_sec"],
                                                  rel=2e-3)
  assert record["vs_timm_compile"] is None  # not requested


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
  args = bench.parse_args(["--model", "MaxViT-T", "--image-size", "384"])
  spec = bench.timm_spec(bench.build_model(args), args, 4)
  assert spec["timm_name"] is None and spec["kwargs"] == {"drop_path_rate": 0.2}
  assert spec["image_size"] == [384, 384]
  # Other families take no architecture overrides in timm: a clear error.
  args = bench.parse_args(["--model", "MaxViT-T", "--set", "depths=(1, 1)", "--set", "embed_dims=(32, 64)",
                           "--vs", "timm"])
  with pytest.raises(ValueError, match="plain ViT models only"):
    bench.timm_spec(bench.build_model(args), args, 4)


def test_timm_names_exist():
  import vit_jax
  assert set(bench.TIMM_NAMES) <= set(vit_jax.list_models())
  timm = bench._import_timm()
  for name in bench.TIMM_NAMES.values():
    assert timm.is_model(name), name
  named = lambda model, size: bench.timm_model_name(model, size, timm.is_model)
  assert named("ViT-B_16", (224, 224)) == ("vit_base_patch16_224", {})
  assert named("ViT-B_16", (384, 384)) == ("vit_base_patch16_384", {})
  assert named("MaxViT-T", (512, 512)) == ("maxvit_tiny_tf_512", {})
  assert named("CrossViT-15-dagger", (408, 408)) == ("crossvit_15_dagger_408", {})
  assert named("ViT-S_16", (256, 256)) == ("vit_small_patch16_224", {"img_size": 256})
  assert named("MaxViT-T", (448, 320)) == ("maxvit_tiny_tf_224", {"img_size": (448, 320)})


def test_timm_worker_reports_a_failing_variant_and_keeps_going():
  # In-process here (torch is imported by the previous test anyway); the CLI runs it in a subprocess.
  spec = {"model": "ViT-Ti_16", "timm_name": "vit_tiny_patch16_224", "num_classes": 10, "batch": 2,
          "image_size": [32, 32], "dtype": "float32", "mode": "infer", "steps": 1, "warmup": 0,
          "modes": ["eager"], "threads": 1, "seed": 0,
          "kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, no_such_option=1)}
  result = bench.timm_worker(spec)
  assert "no_such_option" in result["timm_eager_error"] and "timm_eager_img_per_sec" not in result
  del spec["kwargs"]["no_such_option"]
  result = bench.timm_worker(spec)
  assert result["timm_eager_img_per_sec"] > 0 and "timm_eager_error" not in result


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
  entries = [json.loads(line) for line in bench.DEFAULT_SWEEP.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
  assert entries
  for entry in entries:
    args = bench.parse_args(bench.args_to_argv(entry))
    assert args.model in vit_jax.list_models()
    bench.build_model(args)  # every option exists for that model


def test_sweep_argv_helpers():
  assert bench.args_to_argv({"model": "ViT-B_16", "remat": True, "scan": False, "set": ["depth=2", "mlp_dim=8"],
                             "batch": 4}) == ["--model", "ViT-B_16", "--remat", "--set", "depth=2",
                                              "--set", "mlp_dim=8", "--batch", "4"]
  assert bench._strip_flag(["--sweep", "--vs", "timm"], "--sweep") == ["--vs", "timm"]
  assert bench._strip_flag(["--sweep", "f.jsonl", "--steps", "3"], "--sweep") == ["--steps", "3"]


def test_markdown_table_of_committed_results():
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / "results" / "cpu.jsonl"
  table = bench.markdown_table([str(path)])
  rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
  assert rows and all("ViT-S_16" in row for row in rows)


@pytest.mark.parametrize("argv,message", [
    (TINY_VIT + ["--set", "hidden_size"], "FIELD=VALUE"),
    (TINY_VIT + ["--set", "no_such_field=1"], "Unknown option"),
    (["--model", "CrossViT-S", "--scan"], "--scan is not available for CrossViT-S"),
    (["--model", "ViT-B_99"], "Unknown model"),
])
def test_bad_input_is_a_clear_error(argv, message):
  with pytest.raises((ValueError, TypeError), match=message):
    bench.main(argv)
