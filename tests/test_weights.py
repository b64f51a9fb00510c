"""What holds for every family and format: converters only rename, the shared fit step does the rest."""
import ast
import pathlib

import numpy as np
import pytest

import vit_jax
from vit_jax.models import registry
from vit_jax.weights import core, fit

WEIGHTS = pathlib.Path(vit_jax.__file__).parent / "weights"
SHARED = {"vit_jax.weights.core", "vit_jax.weights", "vit_jax.weights.fit"}


def _imports(path):
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return names


def test_every_family_has_converters_and_converters_do_not_import_each_other():
  converter_modules = {m for family in registry.families() for m in family.converters}
  assert converter_modules, "no family names a converter module"
  for family in registry.families():
    formats = {c.fmt for c in core.converters(family.name)}
    assert "timm" in formats, f"{family.name}: no timm converter"
    assert all(c.family == family.name for c in core.converters(family.name))
  for module in converter_modules:
    path = WEIGHTS.parent.parent / (module.replace(".", "/") + ".py")
    others = {name for name in _imports(path) if name.startswith("vit_jax.weights") and name not in SHARED
              and not name.startswith(("vit_jax.weights.core.", "vit_jax.weights.fit."))}
    assert not others, f"{module} imports other converters: {sorted(others)}"


def test_fit_resizes_posemb_resets_heads_and_restacks_layers():
  model = vit_jax.get_model("ViT-B_16", num_classes=3, image_size=32, patch_size=8, hidden_size=8, depth=2,
                            num_heads=2, mlp_dim=16, scan=True, head_bias_init=-1.0)
  expected = core.abstract_variables(model)
  source = vit_jax.get_model("ViT-B_16", num_classes=5, image_size=16, patch_size=8, hidden_size=8, depth=2,
                             num_heads=2, mlp_dim=16)
  rng = np.random.default_rng(0)
  converted = {k: rng.standard_normal(v.shape).astype(np.float32)
               for k, v in core.abstract_variables(source).items()}
  fitted = fit.fit_to_model(converted, model, expected, head=("head",), posemb_resize="bilinear")
  assert {k: v.shape for k, v in fitted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
  np.testing.assert_array_equal(fitted["params/head/kernel"], 0.0)
  np.testing.assert_array_equal(fitted["params/head/bias"], -1.0)
  posemb = "params/Transformer/posembed_input/pos_embedding"
  np.testing.assert_array_equal(fitted[posemb][:, :1], converted[posemb][:, :1])  # class-token row kept
  key = "Transformer/encoderblock{}/MlpBlock_0/Dense_0/kernel"
  np.testing.assert_array_equal(fitted["params/" + key.format("")][1], converted["params/" + key.format("_1")])
  with pytest.raises(ValueError, match="posemb_resize must be one of"):
    fit.fit_to_model(converted, model, expected, head=("head",), posemb_resize="nearest")


def test_relative_bias_tables_follow_the_window():
  model = vit_jax.get_model("MaxViT-T", num_classes=4, image_size=64, depths=(1, 1), embed_dims=(32, 64),
                            stem_width=16, window_size=4)
  expected = core.abstract_variables(model)
  small = model.clone(window_size=2)
  converted = {k: np.ones(v.shape, np.float32) for k, v in core.abstract_variables(small).items()}
  fitted = fit.fit_to_model(converted, model, expected, head=("head",), posemb_resize="bilinear")
  tables = [k for k in expected if k.endswith("/relative_bias")]
  assert tables and all(fitted[k].shape == tuple(expected[k].shape) for k in tables)
  np.testing.assert_allclose(fitted[tables[0]], 1.0, atol=1e-6)  # a constant table stays constant


def test_every_difference_is_named_at_once():
  model = vit_jax.get_model("CrossViT-Ti", num_classes=2, image_size=48, embed_dims=(24, 32), num_heads=(2, 2),
                            num_multiscale_blocks=1, large_depth=1)
  expected = core.abstract_variables(model)
  converted = {k: np.zeros(v.shape, np.float32) for k, v in expected.items()}
  del converted["params/norm_0/scale"]
  converted["params/norm_0/bias"] = np.zeros(7, np.float32)
  converted["timm:extra.weight"] = np.zeros(1, np.float32)
  with pytest.raises(core.CheckpointMismatchError) as error:
    fit.fit_to_model(converted, model, expected, head=("head_0", "head_1"), posemb_resize="bicubic")
  message = str(error.value)
  assert "missing (1): params/norm_0/scale" in message
  assert "unexpected (1): timm:extra.weight" in message
  assert "params/norm_0/bias: checkpoint has shape (7,), the model expects (24,)" in message
