"""vit_jax.analysis on known answers, capture on every family (logits unchanged), and the analyze command."""
import functools
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from vit_jax import analysis
from vit_jax.models import registry, vit

GRID, PATCH = 4, 16


def test_identity_attention_has_distance_zero_and_rollout_identity():
  tokens = 1 + GRID * GRID
  attention = np.broadcast_to(np.eye(tokens), (2, 3, tokens, tokens))
  np.testing.assert_array_equal(analysis.mean_attention_distance(attention, GRID, PATCH), np.zeros(3))
  np.testing.assert_allclose(analysis.attention_rollout([attention] * 3), np.broadcast_to(np.eye(tokens), (2, tokens, tokens)))


def test_uniform_attention_has_the_mean_pairwise_patch_distance():
  centres = [(r * PATCH, c * PATCH) for r, c in itertools.product(range(GRID), repeat=2)]
  pairwise = np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in itertools.product(centres, repeat=2)])
  tokens = 1 + GRID * GRID
  attention = np.full((2, 2, tokens, tokens), 1.0 / tokens)  # the class token is left out and renormalised
  np.testing.assert_allclose(analysis.mean_attention_distance(attention, GRID, PATCH), [pairwise] * 2)


def test_looking_one_patch_to_the_right_is_one_patch_size_away():
  attention = np.zeros((1, 2, GRID * GRID, GRID * GRID))
  for r, c in itertools.product(range(GRID), repeat=2):
    target = c + 1 if c + 1 < GRID else c - 1  # the last column looks left: also one patch away
    attention[:, 0, r * GRID + c, r * GRID + target] = 1.0
    attention[:, 1, r * GRID + c, r * GRID + c] = 1.0
  np.testing.assert_allclose(analysis.mean_attention_distance(attention, (GRID, GRID), (8, PATCH), 0), [PATCH, 0])
  with pytest.raises(ValueError, match="prefix"):
    analysis.mean_attention_distance(attention, GRID, PATCH, num_prefix_tokens=1)


def test_rollout_multiplies_residual_mixed_layers():
  rng = np.random.default_rng(0)
  layers = [rng.dirichlet(np.ones(5), size=(1, 2, 5)) for _ in range(2)]
  mixed = [0.5 * a.mean(axis=1)[0] + 0.5 * np.eye(5) for a in layers]
  mixed = [m / m.sum(-1, keepdims=True) for m in mixed]
  np.testing.assert_allclose(analysis.attention_rollout(layers)[0], mixed[1] @ mixed[0], rtol=1e-6)
  np.testing.assert_allclose(analysis.attention_rollout(layers).sum(-1), 1.0, rtol=1e-6)


def test_posemb_similarity_of_sincos2d():
  table = vit.posemb_sincos_2d(3, 5, 32)
  similarity = analysis.posemb_similarity(table, (3, 5))
  assert similarity.shape == (3, 5, 3, 5)
  flat = similarity.reshape(15, 15)
  np.testing.assert_allclose(flat, flat.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-6)
  assert flat.max() <= 1 + 1e-6
  # A class-token row in front is left out; a resized table compares positions of the new grid.
  with_cls = np.concatenate([np.ones((1, 1, 32)), table], axis=1)
  np.testing.assert_allclose(analysis.posemb_similarity(with_cls, (3, 5)), similarity, atol=1e-6)
  resized = analysis.posemb_similarity(table, (3, 5), size=(6, 10))
  assert resized.shape == (6, 10, 6, 10)
  np.testing.assert_allclose(np.diagonal(resized.reshape(60, 60)), 1.0, atol=1e-5)


@functools.lru_cache
def tiny(name):
  options = {
      "vit": ("ViT-Ti_16", 32, dict(patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2)),
      "vit_scan": ("ViT-Ti_16", 32, dict(patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2, scan=True)),
      "crossvit": ("CrossViT-Ti", 36, dict(embed_dims=(32, 64), num_heads=(2, 2), large_depth=1, patch_sizes=(6, 8),
                                           num_multiscale_blocks=1, large_image_size=32)),
      "maxvit": ("MaxViT-T", 32, dict(depths=(1, 1), embed_dims=(32, 64), stem_width=16, head_dim=16,
                                      window_size=4)),
  }[name]
  model = registry.get_model(options[0], num_classes=5, image_size=options[1], **options[2])
  variables = jax.device_get(nn.meta.unbox(jax.jit(lambda: registry.init_variables(model, jax.random.key(0)))()))
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, options[1], options[1], 3)))
  return model, variables, images


EXPECTED_LAYERS = {
    "vit": ["Transformer/encoderblock_0", "Transformer/encoderblock_1"],
    "crossvit": [f"multiscale_block_0/{n}" for n in ("branch_0_block_0", "branch_1_block_0", "fusion_0_0", "fusion_1_0")],
    "maxvit": ["block_0_0/block_attn", "block_0_0/grid_attn", "block_1_0/block_attn", "block_1_0/grid_attn"],
}


@pytest.mark.parametrize("name", ["vit", "vit_scan", "crossvit", "maxvit"])
def test_capture_leaves_the_forward_pass_alone(name):
  model, variables, images = tiny(name)
  out = analysis.capture(model, variables, images)
  np.testing.assert_array_equal(out["logits"], jax.jit(model.apply)(variables, images))
  assert set(variables) <= {"params", "batch_stats"}  # init sows nothing
  # The head's input: ViT's class token, CrossViT's two class tokens, MaxViT's pre-logits.
  assert out["features"].shape == (2, {"vit": 32, "vit_scan": 32, "crossvit": 32 + 64, "maxvit": 64}[name])
  assert list(out["layers"]) == EXPECTED_LAYERS[name.removesuffix("_scan")]
  for layer in out["layers"].values():
    assert layer.attention.dtype == np.float32 and layer.attention.shape[0] == 2
    np.testing.assert_allclose(layer.attention.sum(-1), 1.0, rtol=1e-5)
    assert layer.tokens.shape[0] == 2
  if name == "vit_scan":  # the same parameters unrolled give the same attention
    unrolled, _, _ = tiny("vit")
    params = jax.tree.map(lambda x: x, variables["params"])
    stacked = params["Transformer"].pop("encoderblock")
    for i in range(2):
      params["Transformer"][f"encoderblock_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    reference = analysis.capture(unrolled, {"params": params}, images)
    for key, layer in reference["layers"].items():
      np.testing.assert_allclose(out["layers"][key].attention, layer.attention, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out["layers"][key].tokens, layer.tokens, rtol=1e-5, atol=1e-5)
  if name == "maxvit":
    block, grid = out["layers"]["block_0_0/block_attn"], out["layers"]["block_0_0/grid_attn"]
    assert block.attention.shape == (2, 4, 2, 16, 16)  # 8x8 map: 4 windows of 4x4, 2 heads
    # The centre position (4, 4) sees its 4x4 window of neighbours, or every 2nd position of the map.
    for layer, (rows, cols) in ((block, np.mgrid[4:8, 4:8]), (grid, np.mgrid[0:8:2, 0:8:2])):
      seen = analysis.query_map(layer, 4, 4)
      assert np.all(seen[:, rows, cols] > 0) and np.count_nonzero(seen[0]) == 16
      np.testing.assert_allclose(seen.sum((1, 2)), 1.0, rtol=1e-5)
    assert grid.layout.patch_size == (8.0, 8.0) and block.layout.patch_size == (4.0, 4.0)


def test_capture_names_a_wrong_image_size():
  model, variables, images = tiny("vit")
  with pytest.raises(ValueError, match="expects images"):
    analysis.capture(model, variables, images[:, :24])


def test_embedding_filters_are_rgb_tiles():
  rng = np.random.default_rng(0)
  # Filters that are three fixed patterns plus noise: three components explain nearly everything.
  patterns = rng.normal(size=(3, 6 * 6 * 3))
  kernel = (rng.normal(size=(32, 3)) @ patterns + 0.01 * rng.normal(size=(32, 6 * 6 * 3))).T.reshape(6, 6, 3, 32)
  params = {"patch_embed_0": {"conv_0": {"kernel": kernel}}, "block": {"conv": {"kernel": np.ones((3, 3, 8, 8))}}}
  filters = analysis.embedding_filters(params, n=5)
  assert set(filters) == {"patch_embed_0/conv_0/kernel"}  # only convolutions of RGB input
  result = filters["patch_embed_0/conv_0/kernel"]
  assert result.tiles.shape == (5, 6, 6, 3) and result.tiles.min() == 0.0 and result.tiles.max() == 1.0
  assert np.all(np.diff(result.explained_variance_ratio) <= 0) and result.explained_variance_ratio[:3].sum() > 0.99
  with pytest.raises(ValueError, match="RGB"):
    analysis.embedding_filters({"block": params["block"]})


def test_analyze_writes_the_figures(tmp_path, capsys):
  from PIL import Image
  from vit_jax import analyze
  paths = []
  for i in range(2):
    pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    paths.append(str(tmp_path / f"{i}.png"))
  tiny_vit = ["--model", "ViT-Ti_16", "--image-size", "32", "--model-option", "patch_size=8", "--model-option",
              "hidden_size=32", "--model-option", "depth=2", "--model-option", "mlp_dim=64", "--model-option",
              "num_heads=2", "--num-classes", "5"]
  assert analyze.main(tiny_vit + ["--images", *paths, "--out", str(tmp_path / "out")]) == 0
  printed = capsys.readouterr().out
  assert "Transformer/encoderblock_1" in printed and "median" in printed
  for name in ("attention_distance", "posemb_similarity", "embedding_filters", "attention_rollout"):
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "out" / f"{name}.csv").read_text().count("\n") > 1
  rows = (tmp_path / "out" / "attention_distance.csv").read_text().splitlines()
  assert len(rows) == 1 + 2 * 2  # header + 2 layers x 2 heads
  with pytest.raises(SystemExit):
    analyze.main(["--model", "ViT-Nope", "--images", *paths, "--out", str(tmp_path / "bad")])
