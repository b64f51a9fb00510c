"""ViT weights: parity with timm (committed fixtures), official .npz layouts, resizing, export, errors.

Fixtures come from tests/fixtures/make_vit_fixtures.py (timm's own models with random weights).
Parity tolerance: 1e-5 absolute on logits of magnitude ~1-3, float32, highest matmul precision.
The hybrids' reference is timm's model with the official ResNet-root normalisation (what vit_jax
implements); the fixture also holds timm's own normalisation and each of its two differences as controls.
"""
import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.ndimage

import vit_jax
from vit_jax.weights import core, official_npz
from vit_jax.weights.timm import vit as timm_vit

FIX = pathlib.Path(__file__).parent / "fixtures" / "vit"
TOL = 1e-5


def _tuples(x):
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def case(name):
  """(our model options, images, timm logits, weights file stem, posemb resize method) of a fixture case."""
  opts = {k: _tuples(v) for k, v in json.loads((FIX / "cases.json").read_text())[name].items()}
  weights = opts.pop("weights", name)
  resize = opts.pop("posemb_resize", "bilinear")
  io = np.load(FIX / f"{name}.io.npz")
  return opts, io["images"], io["logits"], weights, resize


def logits(variables, model, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply(variables, images))


def npz_dict(stem):
  with np.load(FIX / f"{stem}.official.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name, scan", [
    ("plain_token", False), ("plain_token", True), ("plain_gap", False), ("hybrid_token", False),
    ("hybrid_token", True), ("hybrid_stem_gap", False), ("plain_token_48", False)])
def test_timm_parity(name, scan):
  opts, images, want, weights, resize = case(name)
  model = vit_jax.get_model("ViT-B_16", **dict(opts, scan=scan))
  variables = vit_jax.load_pretrained(FIX / f"{weights}.safetensors", model=model, posemb_resize=resize)
  np.testing.assert_allclose(logits(variables, model, images), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["hybrid_token", "hybrid_stem_gap"])
def test_hybrid_root_normalisation_is_the_official_one(name, monkeypatch):
  """Weight standardisation (w - mean) / (std + 1e-5) and GroupNorm eps 1e-6, as the official code.  Swapping
  in timm's sqrt(var + 1e-8), its eps 1e-5, or both, gives timm's numbers (the fixture's controls), each far
  outside the tolerance: the parity test above fails for either swap."""
  import flax.linen as nn
  import jax.numpy as jnp
  from vit_jax.models import vit
  opts, images, want, weights, _ = case(name)
  io = np.load(FIX / f"{name}.io.npz")
  model = vit_jax.get_model("ViT-B_16", **opts)
  variables = vit_jax.load_pretrained(FIX / f"{weights}.safetensors", model=model)
  np.testing.assert_allclose(logits(variables, model, images), want, atol=TOL, rtol=0)
  for control in ("logits_timm", "logits_std_timm", "logits_gn_timm"):
    assert np.abs(io[control] - want).max() > 10 * TOL, control

  def timm_standardisation(self, param_name, *args, **kwargs):
    param = nn.Conv.param(self, param_name, *args, **kwargs)
    if param_name != "kernel":
      return param
    kernel = jnp.asarray(param, jnp.float32)
    kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel / jnp.sqrt(jnp.var(kernel, axis=(0, 1, 2), keepdims=True) + 1e-8)).astype(param.dtype)

  def timm_group_norm(name, dtype, param_dtype, *args, **kwargs):
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)

  for control, std, gn in [("logits_std_timm", True, False), ("logits_gn_timm", False, True),
                           ("logits_timm", True, True)]:
    with monkeypatch.context() as patch:
      if std:
        patch.setattr(vit.StdConv, "param", timm_standardisation)
      if gn:
        patch.setattr(vit, "_group_norm", timm_group_norm)
      np.testing.assert_allclose(logits(variables, model, images), io[control], atol=TOL, rtol=0, err_msg=control)


def test_parity_tolerance_is_discriminating():
  # The tanh GELU of the official code instead of timm's exact one must already fail the tolerance.
  opts, images, want, _, _ = case("plain_token")
  model = vit_jax.get_model("ViT-B_16", **dict(opts, approximate_gelu=True))
  variables = vit_jax.load_pretrained(FIX / "plain_token.safetensors", model=model)
  assert np.abs(logits(variables, model, images) - want).max() > 10 * TOL


@pytest.mark.parametrize("name", ["plain_token", "hybrid_token"])
def test_official_npz_parity(name):
  # The .npz is checked against timm's own official-npz loader by the fixture script.
  opts, images, want, _, _ = case(name)
  model = vit_jax.get_model("ViT-B_16", **opts)
  assert np.ndim(npz_dict(name).get("gn_root/scale", np.zeros((1, 1, 1, 1)))) == 4  # old GroupNorm shape
  variables = vit_jax.load_pretrained(FIX / f"{name}.official.npz", model=model)
  np.testing.assert_allclose(logits(variables, model, images), want, atol=TOL, rtol=0)


def _linen_names(flat):
  return {k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
          .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"): v for k, v in flat.items()}


def _big_vision(flat):
  """big_vision layout: params/ prefix, scan-stacked blocks, top-level pos_embedding without the cls row
  (its cls row folded into `cls`, as big_vision's fix_old_checkpoints does)."""
  flat = _linen_names(flat)
  pos = flat.pop("Transformer/posembed_input/pos_embedding")
  flat["cls"] = flat["cls"] + pos[:, :1]
  flat["pos_embedding"] = pos[:, 1:]
  blocks = [k for k in flat if k.startswith("Transformer/encoderblock_")]
  for rest in {k.split("/", 2)[2] for k in blocks}:
    flat[f"Transformer/encoderblock/{rest}"] = np.stack([flat[f"Transformer/encoderblock_{i}/{rest}"]
                                                         for i in range(2)])
  flat = {k: v for k, v in flat.items() if k not in blocks}
  return {f"params/{k}": v for k, v in flat.items()}


@pytest.mark.parametrize("variant", ["opt_target", "linen", "big_vision", "mapping_scan_model"])
def test_official_layout_variants(variant):
  opts, images, want, _, _ = case("plain_token")
  flat = npz_dict("plain_token")
  scan = False
  if variant == "opt_target":
    flat = {f"opt/target/{k}": v for k, v in flat.items()}
  elif variant == "linen":
    flat = _linen_names(flat)
  elif variant == "big_vision":
    flat = _big_vision(flat)
  else:
    flat, scan = core.unflatten(flat), True  # a nested mapping, loaded into a scan model
  model = vit_jax.get_model("ViT-B_16", **dict(opts, scan=scan))
  variables = vit_jax.load_pretrained(flat, model=model)
  np.testing.assert_allclose(logits(variables, model, images), want, atol=TOL, rtol=0)


def test_head_replacement_and_class_count():
  opts, images, _, _, _ = case("plain_token")
  opts.pop("num_classes")
  kept = vit_jax.load_pretrained(FIX / "plain_token.official.npz", model="ViT-B_16", **opts)
  assert kept["params"]["head"]["kernel"].shape == (32, 5)  # num_classes=None keeps the checkpoint's head
  model = vit_jax.get_model("ViT-B_16", num_classes=7, head_bias_init=-2.0, **opts)
  variables = vit_jax.load_pretrained(FIX / "plain_token.official.npz", model=model)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], np.zeros((32, 7)))
  np.testing.assert_array_equal(logits(variables, model, images), np.full((2, 7), -2.0))
  np.testing.assert_array_equal(variables["params"]["Transformer"]["encoder_norm"]["scale"],
                                kept["params"]["Transformer"]["encoder_norm"]["scale"])


def test_unused_pre_logits_are_dropped_with_their_head():
  opts, _, _, _, _ = case("plain_token")
  flat = npz_dict("plain_token")
  flat["pre_logits/kernel"], flat["pre_logits/bias"] = np.ones((32, 32), np.float32), np.ones(32, np.float32)
  variables = vit_jax.load_pretrained(flat, model=vit_jax.get_model("ViT-B_16", **opts))
  assert "pre_logits" not in variables["params"]
  assert not np.any(np.asarray(variables["params"]["head"]["kernel"]))
  with_rep = vit_jax.load_pretrained(flat, model=vit_jax.get_model("ViT-B_16", representation_size=32, **opts))
  np.testing.assert_array_equal(with_rep["params"]["pre_logits"]["kernel"], np.ones((32, 32)))
  np.testing.assert_array_equal(with_rep["params"]["head"]["kernel"], flat["head/kernel"])
  with pytest.raises(core.CheckpointMismatchError, match=r"missing \(2\): params/pre_logits/bias"):
    vit_jax.load_pretrained(FIX / "plain_token.official.npz",
                            model=vit_jax.get_model("ViT-B_16", representation_size=32, **opts))


@pytest.mark.parametrize("image_size", [48, (32, 48)])
def test_bilinear_resize_equals_scipy_zoom(image_size):
  # The official interpolate_posembed: scipy.ndimage.zoom(order=1) of the grid, cls row kept.
  opts, _, _, _, _ = case("plain_token")
  old = npz_dict("plain_token")["Transformer/posembed_input/pos_embedding"]
  variables = vit_jax.load_pretrained(FIX / "plain_token.official.npz", model="ViT-B_16",
                                      **dict(opts, image_size=image_size))
  got = np.asarray(variables["params"]["Transformer"]["posembed_input"]["pos_embedding"])
  h, w = (image_size // 8,) * 2 if isinstance(image_size, int) else (image_size[0] // 8, image_size[1] // 8)
  want = scipy.ndimage.zoom(old[0, 1:].reshape(4, 4, 32), (h / 4, w / 4, 1), order=1)
  np.testing.assert_allclose(got[0, 1:].reshape(h, w, 32), want, atol=1e-6)
  np.testing.assert_array_equal(got[0, :1], old[0, :1])


def test_non_square_checkpoint_grid():
  # A checkpoint saved at 32x48 (grid 4x6) loads at 48x72 (grid 6x9): the aspect ratio tells the grid.
  opts, _, _, _, _ = case("plain_token")
  wide = vit_jax.load_pretrained(FIX / "plain_token.official.npz", model="ViT-B_16", **dict(opts, image_size=(32, 48)))
  flat = core.flatten(wide)
  larger = vit_jax.load_pretrained(flat, model="ViT-B_16", **dict(opts, image_size=(48, 72)))
  pos = larger["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  assert pos.shape == (1, 1 + 6 * 9, 32)
  grid = np.asarray(flat["params/Transformer/posembed_input/pos_embedding"])[0, 1:].reshape(4, 6, 32)
  np.testing.assert_allclose(np.asarray(pos)[0, 1:].reshape(6, 9, 32),
                             scipy.ndimage.zoom(grid, (1.5, 1.5, 1), order=1), atol=1e-6)


def test_export_matches_timm_fixture_and_round_trips(tmp_path):
  for name in ("plain_token", "hybrid_token", "hybrid_stem_gap"):
    opts, images, want, _, _ = case(name)
    reference = core.read_source(FIX / f"{name}.safetensors")
    for scan in (False, True):
      model = vit_jax.get_model("ViT-B_16", **dict(opts, scan=scan))
      variables = vit_jax.load_pretrained(FIX / f"{name}.official.npz" if name != "hybrid_stem_gap" else
                                          FIX / f"{name}.safetensors", model=model)
      path = tmp_path / f"{name}_{scan}.safetensors"
      state = vit_jax.export_timm(variables, model=model, path=str(path))
      assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
      for key, value in state.items():  # same weights as timm's own state_dict
        np.testing.assert_allclose(value, reference[key], atol=1e-7, err_msg=key)
      if not scan:  # (the scan export equals the loop export: same reference above)
        back = vit_jax.load_pretrained(path, model=model)
        np.testing.assert_allclose(logits(back, model, images), want, atol=TOL, rtol=0)


def test_export_refuses_what_timm_cannot_hold():
  opts, _, _, _, _ = case("plain_token")
  model = vit_jax.get_model("ViT-B_16", representation_size=16, **opts)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
  with pytest.raises(ValueError, match="representation"):
    vit_jax.export_timm(variables, model=model)


def test_timm_formats_npz_and_pth(tmp_path):
  opts, images, want, _, _ = case("plain_gap")
  model = vit_jax.get_model("ViT-B_16", **opts)
  state = core.read_source(FIX / "plain_gap.safetensors")
  np.savez(tmp_path / "state.npz", **state)
  sources = [tmp_path / "state.npz", state]
  torch = pytest.importorskip("torch")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "state.pth")
  sources.append(tmp_path / "state.pth")
  for source in sources:
    variables = vit_jax.load_pretrained(source, model=model)
    np.testing.assert_allclose(logits(variables, model, images), want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- errors (never a partial load)

def test_checkpoint_of_another_size_names_keys_and_shapes():
  opts, _, _, _, _ = case("plain_token")
  with pytest.raises(core.CheckpointMismatchError,
                     match=r"params/Transformer/encoder_norm/scale: checkpoint has shape \(32,\), the model expects "
                           r"\(64,\)"):
    vit_jax.load_pretrained(FIX / "plain_token.safetensors", model="ViT-B_16",
                            **dict(opts, hidden_size=64, mlp_dim=128))


def test_depth_mismatch_names_the_blocks():
  opts, _, _, _, _ = case("plain_token")
  for scan in (False, True):
    with pytest.raises(core.CheckpointMismatchError, match=r"has 2 params/Transformer/encoderblock_\* layers .* the model has 1"):
      vit_jax.load_pretrained(FIX / "plain_token.safetensors", model="ViT-B_16", **dict(opts, depth=1, scan=scan))


def test_missing_and_unexpected_keys_are_listed():
  opts, _, _, _, _ = case("plain_token")
  state = core.read_source(FIX / "plain_token.safetensors")
  del state["blocks.1.mlp.fc2.bias"]
  state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)  # LayerScale: not in our model
  with pytest.raises(core.CheckpointMismatchError) as error:
    vit_jax.load_pretrained(state, model="ViT-B_16", **opts)
  assert "missing (1): params/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias" in str(error.value)
  assert "unexpected (1): params/blocks.0.ls1.gamma" in str(error.value)


def test_architecture_is_never_changed_silently():
  opts, _, _, _, _ = case("plain_token")
  with pytest.raises(core.CheckpointMismatchError, match="unexpected.*params/cls"):  # token ckpt, gap model
    vit_jax.load_pretrained(FIX / "plain_token.safetensors", model="ViT-B_16", **dict(opts, classifier="gap"))
  with pytest.raises(core.CheckpointMismatchError, match="unexpected.*pos_embedding"):
    vit_jax.load_pretrained(FIX / "plain_token.safetensors", model="ViT-B_16", **dict(opts, posemb="sincos2d"))


@pytest.mark.parametrize("mutate, match", [
    (lambda s: dict(s, **{"fc_norm.weight": np.ones(32, np.float32)}), "fc_norm"),
    (lambda s: {"foo/bar": np.zeros(3)}, r"match no format known for the vit family"),
])
def test_unsupported_checkpoints(mutate, match):
  opts, _, _, _, _ = case("plain_token")
  state = mutate(core.read_source(FIX / "plain_token.safetensors"))
  with pytest.raises(core.CheckpointMismatchError, match=match):
    vit_jax.load_pretrained(state, model="ViT-B_16", **opts)


def test_map_head_and_bad_resize_method():
  opts, _, _, _, _ = case("plain_token")
  flat = npz_dict("plain_token")
  with pytest.raises(core.CheckpointMismatchError, match="MAPHead_0"):
    vit_jax.load_pretrained(dict(flat, **{"MAPHead_0/probe": np.zeros((1, 1, 32))}), model="ViT-B_16", **opts)
  with pytest.raises(ValueError, match="posemb_resize must be one of"):
    vit_jax.load_pretrained(flat, model="ViT-B_16", posemb_resize="nearest", **dict(opts, image_size=48))


def test_detection():
  assert official_npz.detect(npz_dict("plain_token")) and not timm_vit.detect(npz_dict("plain_token"))
  state = core.read_source(FIX / "plain_token.safetensors")
  assert timm_vit.detect(state) and not official_npz.detect(state)
