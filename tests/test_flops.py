"""FLOP counts: the jaxpr count of `vit_jax.flops` against analytic formulas and published GMACs.

`flops.model_macs` counts every dot_general / convolution of the model's jaxpr;
the analytic formulas in tests/flop_formulas.py are written from the papers'
architectures and must agree with it exactly, term by term (CrossViT's in-model
resize included: the `resize` term).  Without that term, the formulas must also
agree within 2% with the published numbers: timm `infer_gmacs` (= the papers'
"GFLOPs"; the performance anchors (fvcore-style counting, §1.4) and
anchors_crossvit_maxvit.md §1.3 / §2.3).  timm's fvcore profiler also counts norms
and softmax, hence the tolerance.  Every registered model at its native size is
checked against timm in tests/test_models.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import vit_jax
from vit_jax import flops
from vit_jax.models import registry

from flop_formulas import macs_terms, paper_macs

# name, image size (None = native), reference GMACs
PUBLISHED_GMACS = [
    ("ViT-S_16", None, 4.61),
    ("ViT-B_16", None, 17.58),
    ("ViT-L_16", None, 61.6),
    ("CrossViT-Ti", None, 1.57),
    ("CrossViT-S", None, 5.63),
    ("CrossViT-15-dagger", 408, 21.45),
    ("CrossViT-18-dagger", 408, 32.47),
    ("MaxViT-T", None, 5.60),
    ("MaxViT-S", None, 11.66),
    ("MaxViT-T", 384, 17.53),
    ("MaxViT-T", 512, 33.49),
]


@pytest.mark.parametrize("name,size,gmacs", PUBLISHED_GMACS,
                         ids=[f"{n}@{s or 'native'}" for n, s, _ in PUBLISHED_GMACS])
def test_formulas_equal_jaxpr_count_and_published_gmacs(name, size, gmacs):
  # Traced only (eval_shape + make_jaxpr): nothing is computed, full-size models take a second or two.
  model = vit_jax.get_model(name, image_size=size)
  terms = macs_terms(model)
  assert flops.model_macs(model) == sum(terms.values()), terms
  ours = paper_macs(model) / 1e9
  assert ours == pytest.approx(gmacs, rel=0.02), f"{name}@{size}: {ours:.3f} GMACs vs reference {gmacs}"


def test_crossvit_resize_is_counted():
  # Branch 1 sees the 240 px input resized to 224 px in the model: two matmuls (rows, then columns)
  # per colour channel, which the jaxpr count includes and the papers / timm leave out.
  model = vit_jax.get_model("CrossViT-Ti")
  resize = 3 * (224 * 240 * 240 + 224 * 224 * 240)
  assert flops.model_macs(model) - paper_macs(model) == resize == 74_833_920
  # That is 4.8% of CrossViT-Ti: with it the count is 1.6376 G vs the published 1.57 G (+4.3%).
  assert flops.model_macs(model) / 1e9 == pytest.approx(1.6376, abs=1e-4)


def test_flops_conventions():
  model = vit_jax.get_model("ViT-B_16")
  macs = flops.model_macs(model)
  assert flops.forward_flops(model) == 2 * macs
  assert flops.train_flops(model) == 6 * macs
  # Hand count of the ViT-B/16 matmuls (anchors §1.4): 12 x (12 x 197 x 768^2 + 2 x 197^2 x 768)
  # + patch embedding 196 x 768 x 768 + head 768 x 1000.
  hand = 12 * (12 * 197 * 768**2 + 2 * 197**2 * 768) + 196 * 768 * 768 + 768 * 1000
  assert macs == hand


def test_layouts_and_attention_implementation_do_not_change_the_count():
  loop = flops.model_macs(vit_jax.get_model("ViT-B_16"))
  # nn.scan: the body counts `depth` times; remat wraps it in a checkpoint primitive.
  assert flops.model_macs(vit_jax.get_model("ViT-B_16", scan=True, remat=True)) == loop
  assert flops.model_macs(vit_jax.get_model("ViT-B_16", dtype=jnp.bfloat16)) == loop
  # The fused cuDNN kernel is opaque (and needs a GPU to trace): counted on the XLA path.
  assert flops.model_macs(vit_jax.get_model("ViT-B_16", attention_implementation="cudnn")) == loop


def test_variables_given_or_not_give_the_same_count():
  model = vit_jax.get_model("ViT-Ti_16", num_classes=7, image_size=32, patch_size=8, depth=1)
  given = flops.model_macs(model, registry.abstract_variables(model))
  flops._CACHE.pop(model)   # (cached per model configuration)
  assert flops.model_macs(model) == given == sum(macs_terms(model).values())


TINY = [
    ("ViT-Ti_16", dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2)),
    ("ViT-Ti_16", dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=48, num_heads=2,
                       classifier="gap", representation_size=24, scan=True, remat=True)),
    ("ViT-Ti_16", dict(image_size=(32, 48), patch_size=8, hidden_size=32, depth=1, mlp_dim=64, num_heads=2)),
    ("R+ViT-Ti_16", dict(image_size=32, patch_size=2, hidden_size=32, depth=1, mlp_dim=64, num_heads=2,
                         resnet=((1, 1), 0.5))),
    ("CrossViT-Ti", dict(image_size=48, large_image_size=32, embed_dims=(16, 32), num_heads=(2, 2),
                         large_depth=1, num_multiscale_blocks=1, multi_conv=True, cross_depth=2)),
    ("CrossViT-Ti", dict(image_size=48, large_image_size=32, embed_dims=(16, 32), num_heads=(2, 2),
                         large_depth=1, num_multiscale_blocks=1, fusion="pairwise")),
    ("CrossViT-Ti", dict(image_size=48, embed_dims=(16, 32), num_heads=(2, 2), large_depth=1,
                         num_multiscale_blocks=1, fusion="all_attention")),
    ("CrossViT-Ti", dict(image_size=48, embed_dims=(16, 32), num_heads=(2, 2), large_depth=1,
                         num_multiscale_blocks=1, fusion="class_token")),
    ("MaxViT-T", dict(image_size=64, window_size=2, depths=(1, 2), embed_dims=(32, 64), stem_width=16)),
    ("MaxViT-T", dict(image_size=64, window_size=2, depths=(1, 1), embed_dims=(32, 64), stem_width=(16, 32),
                      head_hidden_size=None, block_order=("block", "mbconv", "grid"))),
]


@pytest.mark.parametrize("name,overrides", TINY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TINY)])
def test_formula_equals_jaxpr_count_tiny(name, overrides):
  model = vit_jax.get_model(name, num_classes=10, **overrides)
  terms = macs_terms(model)
  assert flops.model_macs(model) == sum(terms.values()), terms
  # Per image: a batch of two costs exactly twice as much (no batch-independent matmuls).
  variables = nn.meta.unbox(registry.abstract_variables(model))
  two = flops.jaxpr_macs(lambda v, x: model.apply(v, x, train=False), variables, registry.input_spec(model, 2))
  assert two == 2 * flops.model_macs(model)


def test_jaxpr_counter_on_hand_counted_function():
  def f(a, b, kernel, x):
    y = a @ b                                                        # 2x3 @ 3x4: 24 MACs
    z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",   # 1x(6x6 out)x4 out-ch x (3x3x2): 2592
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dw = jax.lax.conv_general_dilated(z, jnp.ones((3, 3, 1, 4)), (1, 1), "SAME", feature_group_count=4,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))  # 6x6x4 x 9: 1296
    scanned, _ = jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), y, length=5)  # 5 x 2x4x4: 160
    rematted = jax.checkpoint(lambda c: c @ jnp.ones((4, 3)))(y)   # 2x4x3: 24
    return scanned.sum() + dw.sum() + rematted.sum()
  args = (jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((3, 3, 2, 4)), jnp.ones((1, 8, 8, 2)))
  hand = 24 + 2592 + 1296 + 160 + 24
  assert flops.jaxpr_macs(f, *args) == hand
  assert flops.jaxpr_macs(jax.make_jaxpr(f)(*args)) == hand   # an already traced jaxpr


def test_peak_table():
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.5
  assert flops.peak_tflops("NVIDIA H100 NVL") == 835.5
  assert flops.peak_tflops("NVIDIA H200") == 989.4
  assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert flops.peak_tflops("TPU v4") == 275.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v5p") == 459.0
  assert flops.peak_tflops("cpu") is None
