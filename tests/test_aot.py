"""`python -m vit_jax.aot`: the train step compiled for a TPU topology (libtpu, no TPU), its figures and errors."""
import functools
import importlib.util
import json
import subprocess
import sys
import time

import ml_collections
import pytest

from vit_jax import aot
from vit_jax.train import optim

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


def _config(batch_size=16, scan=True, mesh=(1, 2, 2)):
  sys.path.insert(0, "configs")
  try:
    import testing  # configs/testing.py
  finally:
    sys.path.pop(0)
  c = testing.get_config()
  c.unlock()
  c.model = ml_collections.ConfigDict(dict(name="ViT-Ti_16", patch_size=2, hidden_size=64, depth=2, mlp_dim=128,
                                           num_heads=4, scan=scan, dtype="bfloat16"))
  c.batch_size = batch_size
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


@pytest.fixture(scope="module")
def v5e_2x2():
  return aot.topology_devices("v5e:2x2")


@needs_libtpu
def test_tiny_vit_fsdp_tensor_on_v5e_2x2(v5e_2x2):
  chip, devices = v5e_2x2
  assert chip.name == "v5e" and len(devices) == 4
  small, large = (aot.analyse(_config(b), "v5e:2x2", chip, devices) for b in (16, 256))
  for r in (small, large):
    # The scanned layer loop is counted depth times: within 10% of vit_jax.flops (cost_analysis is not).
    assert r["flops"]["loops"] and max(trips for _, trips in r["flops"]["loops"]) == 2
    assert r["flops"]["hlo_over_analytic"] == pytest.approx(1.0, abs=0.1)
    m = r["memory"]
    assert all(m[k] > 0 for k in ("arguments", "outputs", "temporaries", "generated_code", "total"))
    assert m["fits"] and r["estimate"]["step_s"] > 0 and 0 < r["estimate"]["mfu"] < 1
    # FSDP: the parameters sharded over fsdp are all-gathered for the forward pass.
    assert r["collectives"]["all-gather"]["count"] >= 1
  assert large["memory"]["total"] > small["memory"]["total"]
  assert large["memory"]["prefetched_batches"] == 16 * small["memory"]["prefetched_batches"]
  assert large["flops"]["hlo_matmul_per_device"] == pytest.approx(16 * small["flops"]["hlo_matmul_per_device"],
                                                                   rel=0.05)
  tight = aot.analyse(_config(16), "v5e:2x2", chip, devices, hbm_gib=small["memory"]["total"] / 2 / aot.GIB)
  assert not tight["memory"]["fits"]
  assert "DOES NOT FIT" in aot.describe(tight) and "FITS" in aot.describe(small)
  assert "ESTIMATE" in aot.describe(small)


@pytest.mark.parametrize("topology", ["v9:2x2", "v5e", "tpu-256", "v5e:16x16x16x2"])
def test_unknown_topology_lists_the_accepted_forms(topology):
  with pytest.raises(ValueError, match=r"unknown TPU topology .*v5e:16x16"):
    aot.chip_of(topology)


def test_libtpu_missing_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r'pip install -e "\.\[tpu\]"'):
    aot.check_libtpu()


@needs_libtpu
def test_bad_meshes_fail_before_compiling(v5e_2x2):
  chip, devices = v5e_2x2
  with pytest.raises(ValueError, match="product of data x fsdp x tensor must equal"):
    aot.analyse(_config(mesh=(1, 1, 2)), "v5e:2x2", chip, devices)
  config = _config(mesh=(1, 1, 4))
  config.model.num_heads = 2
  with pytest.raises(ValueError, match="num_heads=2 .* not divisible by the tensor axis"):
    aot.analyse(config, "v5e:2x2", chip, devices)
  config = _config(mesh=(1, 1, 4))
  config.model.mlp_dim = 130
  with pytest.raises(ValueError, match="mlp_dim=130 .* not divisible by the tensor axis"):
    aot.analyse(config, "v5e:2x2", chip, devices)


def test_mesh_candidates_divide_model_and_batch():
  model = type("M", (), {"num_heads": 4, "mlp_dim": 128})()
  meshes = aot.mesh_candidates(8, model, 16)
  assert (8, 1, 1) in meshes and (1, 2, 4) in meshes and (1, 1, 8) not in meshes  # 8 does not divide 4 heads
  assert all(d * f * t == 8 for d, f, t in meshes)
  assert aot.mesh_candidates(8, model, 16, max_tensor=1) == [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1)]


@needs_libtpu
def test_command_line_unknown_topology_is_one_line():
  out = subprocess.run([sys.executable, "-m", "vit_jax.aot", "--config=configs/testing.py", "--topology=v7x:2x2"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "ERROR: unknown TPU topology 'v7x:2x2'" in out.stderr and "Traceback" not in out.stderr


def test_factored_optimiser_keeps_a_quarter_of_adams_state():
  import jax
  import jax.numpy as jnp
  from vit_jax.models import registry
  import flax.linen as nn
  params = nn.meta.unbox(registry.abstract_variables(registry.get_model("ViT-B_16", num_classes=1000))["params"])
  adam = optim.state_bytes_per_param(optax_adamw(), params)
  factored = optim.state_bytes_per_param(optim.scale_by_adafactor(), params)
  assert adam == pytest.approx(8.0, abs=1e-3)  # mu + nu, float32
  # bfloat16 momentum (2 bytes) + a row and a column statistic per matrix (and full ones for vectors).
  assert 2.0 < factored < 2.1  # ViT-B/16: 2.06
  del jax, jnp


def optax_adamw():
  import optax
  return optax.adamw(1e-3)


def test_giants_parameter_counts():
  """ViT-g/14 and ViT-G/14 (Zhai et al. 2106.04560 Table 2: 1011M and 1843M, counted without the MAP head and the
  classifier) by eval_shape."""
  import math
  import jax
  import flax.linen as nn
  from vit_jax.models import registry
  counts = {}
  for name in ("ViT-g_14", "ViT-G_14"):
    model = registry.get_model(name, num_classes=1000)
    assert model.classifier == "map"
    params = nn.meta.unbox(registry.abstract_variables(model)["params"])
    assert "cls" not in params and "MAPHead_0" in params
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    body = total - sum(math.prod(x.shape) for k in ("MAPHead_0", "head") for x in jax.tree.leaves(params[k]))
    counts[name] = (total, body)
  assert counts["ViT-g_14"][0] == 1_037_857_384 and counts["ViT-G_14"][0] == 1_882_797_416
  assert counts["ViT-g_14"][1] / 1e6 == pytest.approx(1011, abs=1)
  assert counts["ViT-G_14"][1] / 1e6 == pytest.approx(1843, abs=1)


def test_parameters_the_mesh_cannot_split_are_named():
  """A width the fsdp axis does not divide leaves the weights replicated (as ViT-G's 1664 on fsdp=256): said."""
  import jax
  from vit_jax.train import sharding as shd
  from vit_jax.train import trainer
  for width, replicated in ((64, False), (66, True)):  # 66 % 4 != 0
    config = _config(mesh=(1, 4, 1))
    config.model.hidden_size, config.model.num_heads = width, 2
    setup = trainer.plan(config, shd.make_mesh(config.mesh.to_dict(), jax.devices()[:4]), 10, 1000)
    report = aot.param_sharding(setup, 4)
    paths = [path for path, _ in report["replicated_large"]]
    assert ("Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in paths) == replicated
    assert (report["bytes_per_device"] > 2 * report["bytes_even_split"]) == replicated


@needs_libtpu
def test_compiler_out_of_memory_is_a_does_not_fit(v5e_2x2, monkeypatch):
  """The TPU compiler refuses a program over the chip's HBM (ViT-G/14 with weights replicated did): reported."""
  from vit_jax.train import memory
  chip, devices = v5e_2x2
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (21.87G) "
             "exceeds available HBM (15.75G).")
  monkeypatch.setattr(memory, "compile_train_step", lambda *a: (_ for _ in ()).throw(RuntimeError(message)))
  r = aot.analyse(_config(), "v5e:2x2", chip, devices)
  assert r["memory"]["fits"] is False and "estimate" not in r
  assert "DOES NOT FIT" in aot.describe(r) and "21.87G" in aot.describe(r)
  monkeypatch.setattr(memory, "compile_train_step", lambda *a: (_ for _ in ()).throw(RuntimeError("INTERNAL: bug")))
  with pytest.raises(RuntimeError, match="INTERNAL"):
    aot.analyse(_config(), "v5e:2x2", chip, devices)


def test_slow_compiles_say_so(v5e_2x2, monkeypatch, capsys):
  """An unscanned deep model is told to scan; a compile that runs on says it is still running."""
  from vit_jax.train import memory
  chip, devices = v5e_2x2
  monkeypatch.setattr(aot, "SCAN_ADVICE_DEPTH", 2)  # the tiny model's depth
  monkeypatch.setattr(aot, "_heartbeat", functools.partial(aot._heartbeat, every_s=0.05))
  monkeypatch.setattr(memory, "compile_train_step", lambda *a: (time.sleep(0.3), (_ for _ in ()).throw(
      RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM (1G)")))[1])
  aot.analyse(_config(scan=False), "v5e:2x2", chip, devices)
  out = capsys.readouterr().out
  assert "has 2 layers and scan=False" in out and "--config.model.scan=True" in out
  assert "... compiling ViT-Ti_16 for v5e:2x2: 0 s" in out
  aot.analyse(_config(scan=True), "v5e:2x2", chip, devices)
  assert "scan=False" not in capsys.readouterr().out


def test_hlo_loop_counts_and_layer_slices():
  """A while loop of 12 trips multiplies its body's dot; a fusion that only dynamic-slices one layer of a stacked
  [12, 64, 64] weight reads that layer (16 KiB), not the stack, each trip."""
  from vit_jax import hlo_stats
  text = """HloModule m

%slice_layer (param_0: f32[12,64,64], param_1: s32[]) -> f32[1,64,64] {
  %param_0 = f32[12,64,64]{2,1,0} parameter(0)
  %param_1 = s32[]{:T(128)} parameter(1)
  %zero = s32[] constant(0)
  ROOT %dynamic-slice.1 = f32[1,64,64]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,64,64}
}

%body (p: (s32[], f32[12,64,64], f32[8,64])) -> (s32[], f32[12,64,64], f32[8,64]) {
  %p = (s32[], f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[12,64,64]{2,1,0} get-tuple-element(%p), index=1
  %x = f32[8,64]{1,0} get-tuple-element(%p), index=2
  %layer = f32[1,64,64]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
  %k = f32[64,64]{1,0} bitcast(%layer)
  %y = f32[8,64]{1,0} dot(%x, %k), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) tuple(%next, %w, %y)
}

%cond (p.1: (s32[], f32[12,64,64], f32[8,64])) -> pred[] {
  %p.1 = (s32[], f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (w.1: f32[12,64,64], x.1: f32[8,64]) -> f32[8,64] {
  %w.1 = f32[12,64,64]{2,1,0} parameter(0)
  %x.1 = f32[8,64]{1,0} parameter(1)
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) tuple(%zero.1, %w.1, %x.1)
  %loop = (s32[], f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,64]{1,0} get-tuple-element(%loop), index=2
}
"""
  stats = hlo_stats.analyse(text, 1)
  assert stats.loops == [("body", 12)]
  assert stats.matmul_flops == 12 * 2 * 8 * 64 * 64 and stats.matmul_flops_once == 2 * 8 * 64 * 64
  # per trip: the slice fusion reads 16 KiB (+ the 4-byte index) and writes 16 KiB; the dot 2 KiB + 16 KiB -> 2 KiB
  per_trip = (64 * 64 * 4 + 4 + 64 * 64 * 4) + (8 * 64 * 4 + 64 * 64 * 4 + 8 * 64 * 4) + (4 + 4 + 4)
  assert stats.hbm_bytes == pytest.approx(12 * per_trip, rel=0.01)


def test_hlo_in_place_updates_in_nested_fusions_and_async_slices():
  """Saving a layer's activations into a [12, 8, 64] stack from a fusion nested in a fusion writes the update
  (2 KiB), not the stack; a slice-start reads its slice, not the array; a copy-start into VMEM reads once."""
  from vit_jax import hlo_stats
  text = """HloModule m

%inner (param_0.i: f32[12,8,64], param_1.i: f32[1,8,64], param_2.i: s32[]) -> f32[12,8,64] {
  %param_0.i = f32[12,8,64]{2,1,0} parameter(0)
  %param_1.i = f32[1,8,64]{2,1,0} parameter(1)
  %param_2.i = s32[] parameter(2)
  %zero.i = s32[] constant(0)
  ROOT %dus = f32[12,8,64]{2,1,0} dynamic-update-slice(%param_0.i, %param_1.i, %param_2.i, %zero.i, %zero.i)
}

%outer (param_0.o: f32[12,8,64], param_1.o: f32[8,64], param_2.o: s32[]) -> f32[12,8,64] {
  %param_0.o = f32[12,8,64]{2,1,0} parameter(0)
  %param_1.o = f32[8,64]{1,0} parameter(1)
  %param_2.o = s32[] parameter(2)
  %row = f32[1,8,64]{2,1,0} bitcast(%param_1.o)
  ROOT %nested = f32[12,8,64]{2,1,0} fusion(%param_0.o, %row, %param_2.o), kind=kLoop, calls=%inner
}

%body (p: (s32[], f32[12,8,64], f32[12,64,64], f32[8,64])) -> (s32[], f32[12,8,64], f32[12,64,64], f32[8,64]) {
  %p = (s32[], f32[12,8,64]{2,1,0}, f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %acts = f32[12,8,64]{2,1,0} get-tuple-element(%p), index=1
  %w = f32[12,64,64]{2,1,0} get-tuple-element(%p), index=2
  %x = f32[8,64]{1,0} get-tuple-element(%p), index=3
  %saved = f32[12,8,64]{2,1,0} fusion(%acts, %x, %i), kind=kLoop, calls=%outer
  %s = ((f32[12,64,64]{2,1,0}), f32[1,64,64]{2,1,0}, s32[]{:S(2)}) slice-start(%w), slice={[0:1], [0:64], [0:64]}
  %layer = f32[1,64,64]{2,1,0} slice-done(%s)
  %c = (f32[8,64]{1,0}, f32[8,64]{1,0:S(1)}, u32[]{:S(2)}) copy-start(%x)
  %x.vmem = f32[8,64]{1,0:S(1)} copy-done(%c)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[12,8,64]{2,1,0}, f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) tuple(%next, %saved, %w, %x)
}

%cond (p.1: (s32[], f32[12,8,64], f32[12,64,64], f32[8,64])) -> pred[] {
  %p.1 = (s32[], f32[12,8,64]{2,1,0}, f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a.1: f32[12,8,64], w.1: f32[12,64,64], x.1: f32[8,64]) -> f32[12,8,64] {
  %a.1 = f32[12,8,64]{2,1,0} parameter(0)
  %w.1 = f32[12,64,64]{2,1,0} parameter(1)
  %x.1 = f32[8,64]{1,0} parameter(2)
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[12,8,64]{2,1,0}, f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) tuple(%zero.1, %a.1, %w.1, %x.1)
  %loop = (s32[], f32[12,8,64]{2,1,0}, f32[12,64,64]{2,1,0}, f32[8,64]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[12,8,64]{2,1,0} get-tuple-element(%loop), index=1
}
"""
  stats = hlo_stats.analyse(text, 1)
  assert stats.loops == [("body", 12)]
  save = 8 * 64 * 4 + 8 * 64 * 4 + 4  # the update written, x read, the index read
  slice_ = 2 * 64 * 64 * 4  # the layer read and written
  copy = 8 * 64 * 4  # read from HBM into VMEM
  assert stats.hbm_bytes == 12 * (save + slice_ + copy + 3 * 4)  # + the counter's add


@needs_libtpu
def test_mesh_axes_that_split_a_torus_axis():
  """fsdp=128 on a 16x16 v6e is no product of whole torus axes: the mesh splits one (jax.make_mesh alone refuses)."""
  from vit_jax.train import sharding as shd
  _, devices = aot.topology_devices("v6e:16x16")
  mesh = shd.make_mesh({"data": 2, "fsdp": 128, "tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 128, "tensor": 1} and len(set(mesh.devices.flat)) == 256


@needs_libtpu
def test_v4_topology_is_one_device_per_megacore_chip():
  """libtpu lists v4 per TensorCore by default (v4:4x4x4 -> 128); a v4 pod runs 64 megacore chips, one device each."""
  from vit_jax.train import sharding as shd
  chip, devices = aot.topology_devices("v4:4x4x4")
  assert chip.name == "v4" and len(devices) == 64
  assert not any(d.core_on_chip for d in devices) and len({tuple(d.coords) for d in devices}) == 64
  mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 1}


def _aot_cli(tmp_path, *flags):
  out_path = tmp_path / "rows.jsonl"
  out = subprocess.run([sys.executable, "-m", "vit_jax.aot", "--config=configs/testing.py", "--topology=v5e:2x2",
                        f"--json={out_path}", *flags], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout, [json.loads(line) for line in out_path.read_text().splitlines()]


@needs_libtpu
def test_search_mesh_compiles_each_candidate_and_sorts_by_estimate(tmp_path):
  stdout, rows = _aot_cli(tmp_path, "--search_mesh", "--search_max_tensor=1")
  assert "3 meshes to compile" in stdout
  assert sorted((r["mesh"]["data"], r["mesh"]["fsdp"], r["mesh"]["tensor"]) for r in rows) == \
      [(1, 4, 1), (2, 2, 1), (4, 1, 1)]
  table = stdout[stdout.index("meshes by estimated step time"):].splitlines()[2:]
  printed = [tuple(int(x) for x in line.split()[:3]) for line in table]
  by_estimate = sorted(rows, key=lambda r: r["estimate"]["step_s"])
  assert printed == [(r["mesh"]["data"], r["mesh"]["fsdp"], r["mesh"]["tensor"]) for r in by_estimate]


@needs_libtpu
def test_find_max_batch_bisects_on_compiled_memory(tmp_path):
  stdout, rows = _aot_cli(tmp_path, "--find_max_batch", "--hbm_gib=0.0085")  # a made-up 8.7 MiB chip
  best = int(stdout.split("largest global batch that fits: ")[1].split()[0])
  fits = {r["batch_size"]: r["memory"]["fits"] for r in rows}
  assert fits[best] and fits[best + 4] is False  # data=4: the next batch is one more image per device
  assert all(f for b, f in fits.items() if b <= best) and not any(f for b, f in fits.items() if b > best)
