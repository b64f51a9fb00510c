"""CrossViT: structure, parameter counts, and numerical parity with timm/IBM.

Fixtures in tests/fixtures/crossvit/ come from tests/fixtures/make_crossvit_fixtures.py
(timm 1.0.31, torch 2.13 CPU): tiny timm CrossVit models with random weights,
their logits on random images, gradients of a scalar loss, and
torch.nn.functional.interpolate(bicubic) references.
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_jax
from vit_jax.models import crossvit
from vit_jax.weights import core

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "crossvit"
FIXTURE_NAMES = ("plain", "dagger", "stacked")
LOGIT_ATOL = 1e-5      # float32, highest matmul precision (the bound)

# Parameter counts with 1000 classes: timm's crossvit_*_408 models (the numbers); the native
# 240 px counts of every CrossViT are checked in tests/test_models.py.
PARAM_COUNTS = {("CrossViT-15-dagger", 408): 28_500_080, ("CrossViT-18-dagger", 408): 44_606_560}


def count(model) -> int:
  return sum(int(np.prod(v.shape)) for v in core.abstract_variables(model).values())


@functools.lru_cache(maxsize=None)
def fixture(name):
  root = FIXTURES
  with np.load(root / f"{name}.npz", allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  config = json.loads(str(arrays.pop("config")))
  return root / f"{name}.safetensors", arrays, config


def tiny_model(name, **overrides):
  _, _, config = fixture(name)
  config = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config, **overrides).items()}
  num_classes, image_size = config.pop("num_classes"), config.pop("image_size")
  return vit_jax.get_model("CrossViT-Ti", num_classes=num_classes, image_size=image_size, **config)


@functools.lru_cache(maxsize=None)
def loaded(name):
  path, arrays, _ = fixture(name)
  model = tiny_model(name)
  return model, vit_jax.load_pretrained(path, model=model), arrays


@functools.lru_cache(maxsize=None)
def _jitted_eval(model):
  # One compilation per model configuration (XLA compiles dominate this file's time).
  return jax.jit(functools.partial(model.apply, train=False))


def apply_eval(model, variables, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_jitted_eval(model)(variables, images))


def random_variables(model, seed=0):
  """Random values for every variable (cheaper than compiling `model.init`)."""
  rng = np.random.default_rng(seed)
  shapes = core.abstract_variables(model)
  return core.unflatten({k: (rng.standard_normal(v.shape) / np.sqrt(max(1, v.shape[0]))).astype(np.float32)
                         for k, v in shapes.items()})


# ----------------------------------------------------------------------------- registry and sizes

def test_registered_names():
  assert vit_jax.list_models("crossvit") == sorted([
      "CrossViT-Ti", "CrossViT-S", "CrossViT-B", "CrossViT-9", "CrossViT-15", "CrossViT-18",
      "CrossViT-9-dagger", "CrossViT-15-dagger", "CrossViT-18-dagger"])
  model = vit_jax.get_model("CrossViT-18-dagger")
  assert model.image_size == 240 and model.branch_sizes() == ((240, 240), (224, 224))
  assert not model.approximate_gelu and model.fusion == "cross_attention"
  assert vit_jax.get_model("CrossViT-15", image_size=408).branch_sizes() == ((408, 408), (384, 384))


def test_parameter_counts_match_timm():
  for (name, size), expected in PARAM_COUNTS.items():
    assert count(vit_jax.get_model(name, image_size=size)) == expected, (name, size)


def test_fusion_ablation_parameter_counts():
  # Paper Table 6 (CrossViT-S): none 23.7M, class token 24.2M, pairwise 24.2M,
  # cross-attention 26.7M (timm: 26.856M).  The paper rounds; allow 0.2M.
  paper = {"none": 23.7e6, "class_token": 24.2e6, "pairwise": 24.2e6, "cross_attention": 26.7e6}
  counts = {f: count(vit_jax.get_model("CrossViT-S", fusion=f)) for f in crossvit.FUSIONS
            if f != "cross_attention"}
  counts["cross_attention"] = 26_856_272   # timm crossvit_small_240 (tests/test_models.py)
  for fusion, expected in paper.items():
    assert abs(counts[fusion] - expected) <= 0.2e6, (fusion, counts[fusion])
  # all-attention, Eq. 2 of the paper: per block f^S, g^S (LN + Dense), LN + MSA in the L width.
  ds, dl = 192, 384
  per_block = (2 * ds + ds * dl + dl) + (2 * dl + dl * ds + ds) + 2 * dl + 4 * (dl * dl + dl)
  assert counts["all_attention"] == counts["none"] + 3 * per_block


def test_large_branch_rule_and_size_errors():
  assert crossvit.large_branch_size(240) == (224, 224)
  assert crossvit.large_branch_size(408) == (384, 384)
  assert crossvit.large_branch_size((240, 408)) == (224, 384)
  with pytest.raises(ValueError, match=r"not divisible.*(240|252)"):
    vit_jax.get_model("CrossViT-Ti", image_size=250).grids()
  with pytest.raises(ValueError, match="large_image_size"):
    vit_jax.get_model("CrossViT-Ti", large_image_size=230).grids()
  with pytest.raises(ValueError, match="fusion must be one of"):
    core.abstract_variables(vit_jax.get_model("CrossViT-Ti", fusion="sum"))


# ----------------------------------------------------------------------------- bicubic resize

def test_bicubic_resize_matches_torch_interpolate():
  with np.load(FIXTURES / "resize.npz", allow_pickle=False) as d:
    ref = {k: d[k] for k in d.files}
  # float32 sample positions (e.g. 119.5 * 240/224 - 0.5) carry rounding of ~1e-5 px that
  # PyTorch and JAX round differently; on white-noise input that moves values by up to ~5e-5
  # (torch float32 vs float64 differ as much).  A wrong kernel or border rule costs >1e-2.
  for key, size in (("240", (224, 5)), ("408", (384, 3)), ("48", (32, 32))):
    out = np.asarray(jax.jit(crossvit.bicubic_resize, static_argnums=1)(ref[f"x_{key}"], size))
    np.testing.assert_allclose(out, ref[f"y_{key}"], atol=1e-4, rtol=0, err_msg=key)
  # JAX's default bicubic (a=-0.5, antialiased) is measurably different: the check can fail.
  other = jax.image.resize(ref["x_240"], (1, 224, 5, 2), "bicubic")
  assert np.abs(np.asarray(other) - ref["y_240"]).max() > 1e-2


# ----------------------------------------------------------------------------- parity with timm

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_timm(name):
  model, variables, arrays = loaded(name)
  if name == "stacked":
    model = model.clone(remat=True)   # rematerialised blocks must not change the numbers
  logits = apply_eval(model, variables, arrays["images"])
  assert logits.shape == arrays["logits"].shape
  np.testing.assert_allclose(logits, arrays["logits"], atol=LOGIT_ATOL, rtol=0)


def test_gradients_match_torch():
  model, variables, arrays = loaded("dagger")
  weights = jnp.linspace(-1.0, 1.0, arrays["logits"].shape[-1])

  def loss_fn(params):
    logits = model.apply({"params": params}, arrays["images"], train=False)
    return (logits * weights).sum() + 0.1 * (logits ** 2).sum()

  with jax.default_matmul_precision("highest"):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  np.testing.assert_allclose(float(loss), float(arrays["loss"]), rtol=1e-5)
  flat = core.flatten(grads)
  params = core.flatten(variables["params"])
  assert set(flat) == set(params)
  for key, g in flat.items():
    assert g.shape == params[key].shape and np.isfinite(np.asarray(g)).all(), key
  # Compare a few gradients with torch's, through the exporter (our layout -> timm's).
  exported = vit_jax.export_timm({"params": grads}, model=model)
  for key in (k for k in arrays if k.startswith("grad/")):
    ref = arrays[key]
    np.testing.assert_allclose(exported[key[len("grad/"):]], ref, atol=1e-4 * max(1.0, np.abs(ref).max()),
                               rtol=0, err_msg=key)


def test_drop_path_schedule_matches_official():
  # Official: linspace(0, rate, sum(M + L')) sliced per block by max(N, M) + L'.
  model = vit_jax.get_model("CrossViT-Ti", drop_path_rate=0.1)
  rates = model.drop_path_schedule()
  expected = np.linspace(0, 0.1, 12)
  np.testing.assert_allclose(np.concatenate(rates), expected)


# ----------------------------------------------------------------------------- loading and export

def test_export_roundtrip_equals_timm_state_dict(tmp_path):
  path, _, _ = fixture("dagger")
  model, variables, _ = loaded("dagger")
  original = core.read_source(path)
  exported = vit_jax.export_timm(variables, model=model, path=str(tmp_path / "out.safetensors"))
  assert set(exported) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  reloaded = vit_jax.load_pretrained(tmp_path / "out.safetensors", model=model)
  for key, value in core.flatten(variables).items():
    np.testing.assert_array_equal(core.flatten(reloaded)[key], value)


def test_ibm_names_load():
  path, arrays, _ = fixture("plain")
  model, variables, _ = loaded("plain")
  ibm = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
         for k, v in core.read_source(path).items()}
  assert "pos_embed.0" in ibm and "pos_embed_0" not in ibm
  from_ibm = vit_jax.load_pretrained(ibm, model=model)
  logits = apply_eval(model, from_ibm, arrays["images"])
  np.testing.assert_allclose(logits, arrays["logits"], atol=LOGIT_ATOL, rtol=0)


def test_new_head_and_resized_position_embeddings():
  path, arrays, _ = fixture("plain")
  size = int(arrays["resized_image_size"])
  model = tiny_model("plain", num_classes=5, image_size=size)   # L-branch stays at 32 px
  variables = vit_jax.load_pretrained(path, model=model)
  params = variables["params"]
  for i in range(2):
    assert params[f"head_{i}"]["kernel"].shape[1] == 5
    assert not np.asarray(params[f"head_{i}"]["kernel"]).any() and not np.asarray(params[f"head_{i}"]["bias"]).any()
  # Bicubic (PyTorch kernel) on the patch rows, CLS row untouched.
  np.testing.assert_allclose(np.asarray(params["pos_embed_0"]), arrays["resized_pos_embed_0"], atol=1e-6, rtol=0)
  original = core.read_source(path)
  np.testing.assert_array_equal(np.asarray(params["pos_embed_1"]), original["pos_embed_1"])


def test_mismatched_checkpoints_fail_clearly():
  path, _, _ = fixture("dagger")
  with pytest.raises(core.CheckpointMismatchError,
                     match=r"missing \(4\): params/patch_embed_0/conv_0/bias(.|\n)*unexpected \(12\): timm:patch_embed"):
    vit_jax.load_pretrained(path, model=tiny_model("plain"))
  with pytest.raises(ValueError, match="fusion='cross_attention'"):
    vit_jax.load_pretrained(path, model=tiny_model("dagger", fusion="none"))
  model, variables, arrays = loaded("plain")
  with pytest.raises(ValueError, match=r"expects images \[batch, 48, 48, 3\]"):
    model.apply(variables, np.zeros((1, 40, 40, 3), np.float32))


# ----------------------------------------------------------------------------- fusion ablation

def tiny_fusion_model(fusion, **overrides):
  # Smallest useful shape: one multi-scale block, grids 3x3 (S) and 2x2 (L).
  return vit_jax.get_model("CrossViT-Ti", num_classes=3, image_size=36, large_image_size=32,
                           embed_dims=(8, 16), num_heads=(2, 4), mlp_ratios=(1.0, 1.0),
                           num_multiscale_blocks=1, large_depth=1, fusion=fusion, **overrides)


# Dropout keys use the "rbg" PRNG: with threefry every dropout site adds an unrolled hash
# and the train-mode compile on CPU takes ~2.5x longer (27 s vs 11 s CPU measured).
def test_train_mode_runs_and_differs_from_eval():
  model, variables, arrays = loaded("plain")
  model = model.clone(dropout_rate=0.1, attention_dropout_rate=0.1, drop_path_rate=0.2)
  train = jax.jit(lambda v, rng: model.apply(v, arrays["images"], train=True, rngs={"dropout": rng}))
  logits_a = np.asarray(train(variables, jax.random.key(0, impl="rbg")))
  logits_b = np.asarray(train(variables, jax.random.key(1, impl="rbg")))
  evaluated = arrays["logits"]    # eval logits of these weights (timm; see test_logits_match_timm)
  assert logits_a.shape == evaluated.shape and np.isfinite(logits_a).all()
  assert np.abs(logits_a - evaluated).max() > 1e-3
  assert np.abs(logits_a - logits_b).max() > 1e-3


# "none" is traced by test_fusion_ablation_parameter_counts; cross_attention is the
# fusion of the parity, gradient and train-mode tests above.
@pytest.mark.parametrize("fusion", ("all_attention", "class_token", "pairwise"))
def test_heuristic_fusions_in_train_mode(fusion):
  """Each ablation fusion runs with dropout and drop-path active, and its parameters matter."""
  model = tiny_fusion_model(fusion, dropout_rate=0.1, attention_dropout_rate=0.1, drop_path_rate=0.3)
  images = np.random.default_rng(0).standard_normal((2, 36, 36, 3)).astype(np.float32)
  variables = random_variables(model)
  train = jax.jit(lambda v, rng: model.apply(v, images, train=True, rngs={"dropout": rng}))
  logits_a = np.asarray(train(variables, jax.random.key(0, impl="rbg")))
  logits_b = np.asarray(train(variables, jax.random.key(1, impl="rbg")))
  assert logits_a.shape == (2, 3) and np.isfinite(logits_a).all()
  assert np.abs(logits_a - logits_b).max() > 1e-4          # dropout / drop-path are active
  # Changing only the fusion's own parameters changes the output (same rng key).
  flat = core.flatten(variables)
  fusion_keys = [k for k in flat if any(part.startswith(("proj_", "revert_proj_", "all_attention"))
                                         for part in k.split("/"))]
  assert fusion_keys
  perturbed = core.unflatten({k: v * 1.5 if k in fusion_keys else v for k, v in flat.items()})
  assert np.abs(np.asarray(train(perturbed, jax.random.key(0, impl="rbg"))) - logits_a).max() > 1e-4


# ----------------------------------------------------------------------------- the parity test can fail

@pytest.mark.parametrize("control", ["tanh_gelu", "layer_norm_eps_1e-5"])
def test_parity_tolerance_is_discriminating(control, monkeypatch):
  """Each detail a port gets wrong must fail the logit tolerance: the tanh GELU of the official ViT code
  instead of the exact one, LayerNorm eps 1e-5 (PyTorch's default) instead of timm/IBM's 1e-6."""
  model, variables, arrays = loaded("plain")
  if control == "tanh_gelu":
    model = model.clone(approximate_gelu=True)
  else:
    monkeypatch.setattr(crossvit, "LAYER_NORM_EPS", 1e-5)
  with jax.default_matmul_precision("highest"):  # not the cached jit: its trace holds the real constants
    logits = np.asarray(model.apply(variables, arrays["images"], train=False))
  assert np.abs(logits - arrays["logits"]).max() > 10 * LOGIT_ATOL, control
