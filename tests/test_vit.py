"""ViT / hybrid model: exact parameter counts, options, layouts and clear errors (tiny configs only)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_jax
from vit_jax.models import vit
from vit_jax.weights import core, fit

TINY = dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2)


def count(model):
  return sum(int(np.prod(v.shape)) for v in core.abstract_variables(model).values())


def tiny(num_classes=5, **overrides):
  return vit_jax.get_model("ViT-B_16", num_classes=num_classes, **dict(TINY, **overrides))


def images(size=32, batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def random_head(variables, seed=1):
  """The head is zero-initialised (official); give it values so logits depend on everything."""
  params = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(variables))
  head = params["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(seed), head["kernel"].shape)
  return params


def test_scan_layout_has_a_layers_axis():
  shapes = core.abstract_variables(vit_jax.get_model("ViT-B_16", scan=True))
  query = shapes["params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]
  assert query.shape == (12, 768, 12, 64)
  assert not any("encoderblock_" in k for k in shapes)


def test_official_names_and_shapes_of_vit_b16():
  model = vit_jax.get_model("ViT-B_16")
  assert count(model) == 86_567_656   # official models_test.py; every model: tests/test_models.py
  shapes = {k: v.shape for k, v in core.abstract_variables(model).items()}
  assert shapes["params/cls"] == (1, 1, 768)
  assert shapes["params/embedding/kernel"] == (16, 16, 3, 768)
  assert shapes["params/Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  assert shapes["params/Transformer/encoderblock_11/MultiHeadDotProductAttention_0/out/kernel"] == (12, 64, 768)
  assert shapes["params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] == (768, 3072)
  assert shapes["params/Transformer/encoder_norm/scale"] == (768,)
  assert shapes["params/head/kernel"] == (768, 1000)
  hybrid = core.abstract_variables(vit_jax.get_model("R50+ViT-B_16"))
  assert hybrid["params/conv_root/kernel"].shape == (7, 7, 3, 64)
  assert hybrid["params/block1/unit1/conv_proj/kernel"].shape == (1, 1, 64, 256)
  assert hybrid["params/block3/unit9/gn3/scale"].shape == (1024,)
  assert hybrid["params/embedding/kernel"].shape == (1, 1, 1024, 768)


def test_r_ti_grid_is_7x7_at_224():
  # The stem alone downsamples 4x, times 8x8 patches: 28x28 -> 7x7 (+ cls) as in the official checkpoint.
  shapes = core.abstract_variables(vit_jax.get_model("R+ViT-Ti_16"))
  assert shapes["params/Transformer/posembed_input/pos_embedding"].shape == (1, 50, 192)


@pytest.mark.parametrize("options", [
    dict(), dict(classifier="gap"), dict(posemb="sincos2d"), dict(representation_size=16),
    dict(resnet=((1, 1), 0.5), patch_size=1), dict(image_size=(32, 48))])
def test_tiny_forward_shapes(options):
  # Shapes only (eval_shape: no compilation); the numbers are checked against timm in test_weights_vit.
  model = tiny(depth=1, **options)
  size = model.image_size
  x = jnp.zeros((2,) + (size if isinstance(size, tuple) else (size, size)) + (3,))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  params = nn.meta.unbox(variables)["params"]
  assert ("cls" in params) == (model.classifier == "token")
  assert ("pre_logits" in params) == (model.representation_size is not None)
  assert ("posembed_input" in params["Transformer"]) == (model.posemb == "learn")


def test_sincos2d_table():
  table = vit.posemb_sincos_2d(2, 3, 8)
  assert table.shape == (1, 6, 8)
  # Token (row 1, col 2): omega = [1, 1e-4]; layout [sin x, cos x, sin y, cos y].
  omega = np.array([1.0, 1e-4])
  np.testing.assert_allclose(table[0, 5], np.concatenate(
      [np.sin(2 * omega), np.cos(2 * omega), np.sin(1 * omega), np.cos(1 * omega)]), rtol=1e-6)


def test_scan_and_loop_layouts_convert_both_ways():
  # (Scan models reproduce timm's logits in test_weights_vit; here: the layout converters themselves.)
  loop = core.abstract_variables(tiny())
  scan = core.abstract_variables(tiny(scan=True))
  values = {k: np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) for k, v in loop.items()}
  scanned = fit.match_layout(values, scan)
  assert {k: v.shape for k, v in scanned.items()} == {k: v.shape for k, v in scan.items()}
  key = "MultiHeadDotProductAttention_0/query/kernel"
  np.testing.assert_array_equal(scanned[f"params/Transformer/encoderblock/{key}"][1],
                                values[f"params/Transformer/encoderblock_1/{key}"])
  back = fit.match_layout(scanned, loop)
  assert set(back) == set(values) and all(np.array_equal(back[k], values[k]) for k in values)


def test_remat_changes_nothing_numerically():
  x = images()
  base = tiny(depth=1)
  variables = random_head(base.init(jax.random.key(0), x))

  def loss_and_grad(model):
    loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables)

  with jax.default_matmul_precision("highest"):
    want_loss, want_grad = loss_and_grad(base)
    for model in (tiny(depth=1, remat=True, remat_policy="dots_with_no_batch_dims_saveable"),):
      got_loss, got_grad = loss_and_grad(model)
      np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
      # Recomputation reorders float32 sums (some gradients are pure cancellation noise): compare the whole
      # gradient vector by its relative error.
      got, want = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)]) for t in (got_grad, want_grad))
      assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_dropout_and_drop_path_only_in_training():
  x = images()
  # (Attention-probability dropout itself is a feature of layers.Attention, tested with the shared layers.)
  for options in (dict(dropout_rate=0.3), dict(drop_path_rate=0.5, attention_dropout_rate=0.1, scan=True, remat=True)):
    model = tiny(**options)
    variables = random_head(model.init(jax.random.key(0), x))
    apply = jax.jit(model.apply, static_argnames="train")  # eager scan would recompile for every call
    eval_out = apply(variables, x)
    train_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(train_a - eval_out)).max() > 1e-4, options
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-4, options


def test_stochastic_depth_is_linear_in_depth():
  # Block 0 gets rate 0: a one-block model never drops, whatever the rate.
  x = images()
  model = tiny(depth=1, drop_path_rate=0.9)
  variables = random_head(model.init(jax.random.key(0), x))
  np.testing.assert_allclose(model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}),
                             model.apply(variables, x), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  x = images()
  model32, model16 = tiny(), tiny(dtype=jnp.bfloat16)
  variables = random_head(model32.init(jax.random.key(0), x))
  init16 = nn.meta.unbox(jax.eval_shape(model16.init, jax.random.key(0), x))
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(init16))
  out16, out32 = model16.apply(variables, x), model32.apply(variables, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))


def test_logical_axis_names():
  x = images()
  names = {}
  for scan in (False, True):
    model = tiny(scan=scan, resnet=((1,), 0.5), patch_size=2)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.Partitioned) for _, v in leaves)
    names[scan] = {jax.tree_util.keystr(p): v.names for p, v in leaves}
  assert names[False]["['params']['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"] == \
      ("embed", "mlp")
  assert names[True]["['params']['Transformer']['encoderblock']['MultiHeadDotProductAttention_0']['query']"
                     "['kernel']"] == ("layers", "embed", "heads", "kv")
  assert names[True]["['params']['head']['kernel']"] == ("embed", "classes")


def test_cudnn_switch_is_validated_on_cpu():
  with pytest.raises(ValueError, match="attention_implementation"):
    tiny(attention_implementation="flash").init(jax.random.key(0), images())


@pytest.mark.parametrize("options, match", [
    (dict(image_size=30), r"image size 30x30 is not divisible by the patch size 8x8; use e\.g\. 24 or 32 px"),
    (dict(resnet=((1, 1), 0.5), patch_size=1, image_size=36), r"36x36 is not divisible by the total stride"),
    (dict(classifier="cls"), "classifier must be one of"),
    (dict(posemb="sincos"), "posemb must be one of"),
    (dict(num_heads=3), "not divisible by num_heads=3"),
    (dict(remat=True, remat_policy="dots_saveable_typo"), "remat_policy 'dots_saveable_typo'"),
    (dict(resnet=((1,), 0.25), patch_size=2), "multiple of 32"),
])
def test_bad_configuration_is_named_when_the_model_is_built(options, match):
  with pytest.raises(ValueError, match=match):
    tiny(**options)


def test_wrong_input_resolution_is_named():
  model = tiny()
  variables = model.init(jax.random.key(0), images())
  with pytest.raises(ValueError, match=r"expects images \[batch, 32, 32, 3\].*got \(2, 48, 48, 3\).*image_size"):
    model.apply(variables, images(48))


def test_unknown_option_is_rejected():
  with pytest.raises(TypeError, match="hidden_dim"):
    vit_jax.get_model("ViT-B_16", hidden_dim=32)
