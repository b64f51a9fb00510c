"""big_vision checkpoints (MAP head, SigLIP towers, bfloat16, sincos2d, representation layer, scan) and
Hugging Face transformers ViT: parity with the reference implementations and export.

Fixtures: tests/fixtures/make_big_vision_fixtures.py (big_vision's own `models/vit.py`) and
tests/fixtures/make_hf_vit_fixtures.py (transformers' ViTForImageClassification / ViTModel).
Tolerance: 1e-5 absolute on outputs of magnitude ~1-3, float32, highest matmul precision.
"""
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

import vit_jax
from vit_jax.weights import core
from vit_jax.weights.transformers import vit as hf_vit

BV = pathlib.Path(__file__).parent / "fixtures" / "big_vision"
HF = pathlib.Path(__file__).parent / "fixtures" / "hf_vit"
TOL = 1e-5
HF_OPTS = dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2, approximate_gelu=False)


def outputs(model, variables, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply(variables, images))


def bv_case(name):
  opts = json.loads((BV / "cases.json").read_text())[name]
  io = np.load(BV / f"{name}.io.npz")
  source = f"{BV / name}.npz" + (":img" if name == "map_img" else "")
  return opts, source, io["images"], io["outputs"]


# ----------------------------------------------------------------------------- big_vision

@pytest.mark.parametrize("name", ["sincos_gap", "token_rep", "token_scan", "map_img"])
@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_parity(name, scan):
  # sincos_gap: no position-embedding parameters; token_rep: representation layer (rep_size=16);
  # token_scan: trained with scan=True (stacked encoderblock); map_img: the MAP head of a SigLIP-style
  # image tower (no head), read with FILE.npz:img out of a two-tower bfloat16 checkpoint.
  opts, source, images, want = bv_case(name)
  model = vit_jax.get_model("ViT-B_16", **dict(opts, scan=scan))
  variables = vit_jax.load_pretrained(source, model=model)
  assert np.abs(outputs(model, variables, images) - want).max() < TOL


def test_map_head_parameter_names_are_big_vision_s():
  opts, source, _, _ = bv_case("map_img")
  flat = core.read_source(source)
  assert {k for k in flat if k.startswith("MAPHead_0/")} == {
      "MAPHead_0/probe", *(f"MAPHead_0/MultiHeadDotProductAttention_0/{p}/{w}" for p in ("query", "key", "value", "out")
                           for w in ("kernel", "bias")),
      "MAPHead_0/LayerNorm_0/scale", "MAPHead_0/LayerNorm_0/bias",
      *(f"MAPHead_0/MlpBlock_0/Dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias"))}
  ours = {k.replace("Transformer/posembed_input/", "") for k in core.abstract_variables(
      vit_jax.get_model("ViT-B_16", **opts))}  # big_vision keeps pos_embedding at the top level
  assert ours == {f"params/{k}" for k in flat}
  # Early ViT-G files kept the MAP head's parameters at the top level (big_vision's fix_old_checkpoints).
  inlined = {k.removeprefix("MAPHead_0/"): v for k, v in flat.items()}
  model = vit_jax.get_model("ViT-B_16", **opts)
  _, _, images, want = bv_case("map_img")
  assert np.abs(outputs(model, vit_jax.load_pretrained(inlined, model=model), images) - want).max() < TOL


def test_two_tower_checkpoint_without_a_tower_says_how_to_pick_one():
  opts, source, _, _ = bv_case("map_img")
  with pytest.raises(core.CheckpointMismatchError, match=r"several models \(img, .*'FILE.npz:img'"):
    vit_jax.load_pretrained(source.removesuffix(":img"), model="ViT-B_16", **opts)
  with pytest.raises(core.CheckpointMismatchError, match="no part 'image'.*'img'"):
    vit_jax.load_pretrained(source.replace(":img", ":image"), model="ViT-B_16", **opts)


def test_bfloat16_npz_loads_as_bfloat16_and_through_the_posemb_resize(tmp_path):
  opts, source, _, _ = bv_case("map_img")
  flat = core.read_source(source)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())  # numpy's raw 'V2' viewed back
  as_f32 = {k: v.astype(np.float32) for k, v in flat.items()}
  for size in (32, 48):  # 48 px: the 4x4 position-embedding grid is resized to 6x6
    got = vit_jax.load_pretrained(source, model="ViT-B_16", **dict(opts, image_size=size))
    want = vit_jax.load_pretrained(as_f32, model="ViT-B_16", **dict(opts, image_size=size))
    jax.tree.map(np.testing.assert_array_equal, got, want)
  kept = vit_jax.load_pretrained(source, model="ViT-B_16", **dict(opts, param_dtype="bfloat16"))
  leaf = kept["params"]["MAPHead_0"]["probe"]
  assert leaf.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(leaf), flat["MAPHead_0/probe"])
  # The same weights in a BF16 .safetensors (written by hand: safetensors.numpy knows no bfloat16).
  header, blobs, offset = {}, [], 0
  for key, value in flat.items():
    blob = np.ascontiguousarray(value).tobytes()
    header[key] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  (tmp_path / "bf16.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
  read = core.read_source(tmp_path / "bf16.safetensors")
  assert read.keys() == flat.keys()
  for key, value in read.items():
    assert value.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(value.astype(np.float32), as_f32[key])


def test_features_model_drops_a_head_and_timm_export_refuses_map():
  opts, _, images, _ = bv_case("token_rep")
  features = vit_jax.get_model("ViT-B_16", **dict(opts, num_classes=0))
  variables = vit_jax.load_pretrained(f"{BV / 'token_rep'}.npz", model=features)
  assert "head" not in variables["params"] and outputs(features, variables, images).shape == (2, 16)
  map_opts, map_source, _, _ = bv_case("map_img")
  model = vit_jax.get_model("ViT-B_16", **map_opts)
  with pytest.raises(ValueError, match="classifier='map' cannot be exported to timm"):
    vit_jax.export_timm(vit_jax.load_pretrained(map_source, model=model), model=model)


# ----------------------------------------------------------------------------- Hugging Face transformers

@pytest.mark.parametrize("name, options", [("classifier", dict(num_classes=5)),
                                           ("pooler", dict(num_classes=0, representation_size=32))])
@pytest.mark.parametrize("scan", [False, True])
def test_transformers_parity(name, options, scan):
  io = np.load(HF / f"{name}.io.npz")
  model = vit_jax.get_model("ViT-B_16", **HF_OPTS, **options, scan=scan)
  variables = vit_jax.load_pretrained(HF / name / "model.safetensors", model=model)
  assert np.abs(outputs(model, variables, io["images"]) - io["outputs"]).max() < TOL


def test_transformers_5_in_memory_names_load_too():
  state = core.read_source(HF / "classifier" / "model.safetensors")
  renamed = {k.replace("encoder.layer.", "layers.").replace("attention.attention.query", "attention.q_proj")
             .replace("attention.attention.key", "attention.k_proj").replace("attention.attention.value",
                                                                               "attention.v_proj")
             .replace("attention.output.dense", "attention.o_proj").replace("intermediate.dense", "mlp.fc1")
             .replace("output.dense", "mlp.fc2"): v for k, v in state.items()}
  model = vit_jax.get_model("ViT-B_16", num_classes=5, **HF_OPTS)
  io = np.load(HF / "classifier.io.npz")
  got = outputs(model, vit_jax.load_pretrained(renamed, model=model), io["images"])
  assert np.abs(got - io["outputs"]).max() < TOL


@pytest.mark.parametrize("name, options", [("classifier", dict(num_classes=5)),
                                           ("pooler", dict(num_classes=0, representation_size=32))])
def test_transformers_export_is_the_hub_layout(tmp_path, name, options):
  reference = core.read_source(HF / name / "model.safetensors")
  for scan in (False, True):
    model = vit_jax.get_model("ViT-B_16", **HF_OPTS, **options, scan=scan)
    variables = vit_jax.load_pretrained(HF / name / "model.safetensors", model=model)
    state = vit_jax.export_transformers(variables, model=model, path=tmp_path / f"{name}_{scan}")
    assert state.keys() == reference.keys()
    for key, value in state.items():  # the same arrays transformers' save_pretrained wrote
      np.testing.assert_array_equal(value, reference[key], err_msg=key)
    written = json.loads((tmp_path / f"{name}_{scan}" / "config.json").read_text())
    theirs = json.loads((HF / name / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias"):
      assert written[key] == theirs[key], key
    assert written["architectures"] == theirs["architectures"]
  back = vit_jax.load_pretrained(tmp_path / f"{name}_False" / "model.safetensors", model=model)
  io = np.load(HF / f"{name}.io.npz")
  assert np.abs(outputs(model, back, io["images"]) - io["outputs"]).max() < TOL


def test_transformers_export_refuses_what_hf_vit_cannot_hold():
  for options, match in ((dict(classifier="gap"), "classifier='gap'"), (dict(posemb="sincos2d"), "posemb"),
                         (dict(representation_size=8), "representation layer before a head")):
    model = vit_jax.get_model("ViT-B_16", num_classes=5, **HF_OPTS, **options)
    with pytest.raises(ValueError, match=match):
      hf_vit.check_exportable(model)


def test_transformers_detection_is_exclusive():
  from vit_jax.weights import official_npz
  from vit_jax.weights.timm import vit as timm_vit
  state = core.read_source(HF / "pooler" / "model.safetensors")
  assert hf_vit.detect(state) and not timm_vit.detect(state) and not official_npz.detect(state)
