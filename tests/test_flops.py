"""Analytic FLOP counts: against the papers' / timm's GMACs, and against an exact jaxpr count.

Reference GMACs (timm `infer_gmacs`, = the papers' "GFLOPs") from
/work/shared/reference/anchors_perf_ecosystem.md §1.4 and anchors_crossvit_maxvit.md
§1.3 / §2.3.  Our formulas count matmul/conv MACs only; timm's profiler also counts
norms and softmax, hence the 2% tolerance of the issue.  The jaxpr count walks every
dot_general / convolution the model really executes, so formula and model must agree
exactly there.
"""
import jax
import jax.numpy as jnp
import pytest

import vit_jax
from vit_jax import flops

# name, image size (None = native), reference GMACs
PAPER_GMACS = [
    ("ViT-S_16", None, 4.61),
    ("ViT-B_16", None, 17.58),
    ("ViT-L_16", None, 61.6),
    ("CrossViT-Ti", None, 1.57),
    ("CrossViT-S", None, 5.63),
    ("CrossViT-B", None, 21.22),
    ("CrossViT-9", None, 1.85),
    ("CrossViT-15", None, 5.81),
    ("CrossViT-18", None, 9.05),
    ("CrossViT-9-dagger", None, 1.99),
    ("CrossViT-15-dagger", None, 6.13),
    ("CrossViT-18-dagger", None, 9.50),
    ("CrossViT-15-dagger", 408, 21.45),
    ("CrossViT-18-dagger", 408, 32.47),
    ("MaxViT-T", None, 5.60),
    ("MaxViT-S", None, 11.66),
    ("MaxViT-B", None, 24.04),
    ("MaxViT-L", None, 43.68),
    ("MaxViT-T", 384, 17.53),
    ("MaxViT-T", 512, 33.49),
]


@pytest.mark.parametrize("name,size,gmacs", PAPER_GMACS, ids=[f"{n}@{s or 'native'}" for n, s, _ in PAPER_GMACS])
def test_gmacs_match_papers_within_2_percent(name, size, gmacs):
  model = vit_jax.get_model(name, image_size=size)
  ours = flops.model_macs(model) / 1e9
  assert ours == pytest.approx(gmacs, rel=0.02), f"{name}@{size}: {ours:.3f} GMACs vs reference {gmacs}"


def test_flops_conventions():
  model = vit_jax.get_model("ViT-B_16")
  macs = flops.model_macs(model)
  assert flops.forward_flops(model) == 2 * macs
  assert flops.train_flops(model) == 6 * macs
  # Hand count of the ViT-B/16 matmuls (anchors §1.4): 12 x (12 x 197 x 768^2 + 2 x 197^2 x 768)
  # + patch embedding 196 x 768 x 768 + head 768 x 1000.
  hand = 12 * (12 * 197 * 768**2 + 2 * 197**2 * 768) + 196 * 768 * 768 + 768 * 1000
  assert macs == hand


def _jaxpr_per_image(model):
  h, w = flops._pair(model.image_size)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3)), train=False))
  return flops.per_image_jaxpr_macs(lambda v, x: model.apply(v, x, train=False), variables, (h, w, 3))


TINY = [
    ("ViT-Ti_16", dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=64, num_heads=2)),
    ("ViT-Ti_16", dict(image_size=32, patch_size=8, hidden_size=32, depth=2, mlp_dim=48, num_heads=2,
                       classifier="gap", representation_size=24, scan=True, remat=True)),
    ("R+ViT-Ti_16", dict(image_size=32, patch_size=2, hidden_size=32, depth=1, mlp_dim=64, num_heads=2,
                         resnet=((1, 1), 0.5))),
    ("CrossViT-Ti", dict(image_size=48, large_image_size=32, embed_dims=(16, 32), num_heads=(2, 2),
                         large_depth=1, num_multiscale_blocks=1, multi_conv=True, cross_depth=2)),
    ("CrossViT-Ti", dict(image_size=48, large_image_size=32, embed_dims=(16, 32), num_heads=(2, 2),
                         large_depth=1, num_multiscale_blocks=1, fusion="pairwise")),
    ("CrossViT-Ti", dict(image_size=48, embed_dims=(16, 32), num_heads=(2, 2), large_depth=1,
                         num_multiscale_blocks=1, fusion="all_attention")),
    ("MaxViT-T", dict(image_size=64, window_size=2, depths=(1, 2), embed_dims=(32, 64), stem_width=16)),
    ("MaxViT-T", dict(image_size=64, window_size=2, depths=(1, 1), embed_dims=(32, 64), stem_width=(16, 32),
                      head_hidden_size=None, block_order=("block", "mbconv", "grid"))),
]


@pytest.mark.parametrize("name,overrides", TINY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TINY)])
def test_formula_equals_jaxpr_count_tiny(name, overrides):
  model = vit_jax.get_model(name, num_classes=10, **overrides)
  terms = flops.macs_terms(model)
  assert _jaxpr_per_image(model) == sum(terms.values()), terms


@pytest.mark.parametrize("name,overrides", [("ViT-B_16", dict(scan=True))])
def test_formula_equals_jaxpr_count_full_size(name, overrides):
  # Traced only (eval_shape + make_jaxpr): nothing is computed.
  model = vit_jax.get_model(name, **overrides)
  assert _jaxpr_per_image(model) == sum(flops.macs_terms(model).values())


def test_jaxpr_counter_on_hand_counted_function():
  def f(a, b, kernel, x):
    y = a @ b                                                        # 2x3 @ 3x4: 24 MACs
    z = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",   # 1x(6x6 out)x4 out-ch x (3x3x2): 2592
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dw = jax.lax.conv_general_dilated(z, jnp.ones((3, 3, 1, 4)), (1, 1), "SAME", feature_group_count=4,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))  # 6x6x4 x 9: 1296
    scanned, _ = jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), y, length=5)  # 5 x 2x4x4: 160
    return scanned.sum() + dw.sum()
  args = (jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((3, 3, 2, 4)), jnp.ones((1, 8, 8, 2)))
  assert flops.jaxpr_macs(f, *args) == 24 + 2592 + 1296 + 160


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


def test_unknown_fusion_is_a_clear_error():
  with pytest.raises(ValueError, match="no FLOP formula for CrossViT fusion 'bogus'"):
    flops.crossvit_macs(branch_sizes=(240, 224), patch_sizes=(12, 16), dims=(96, 192), depths=(1, 4),
                        num_blocks=3, mlp_ratios=(4, 4), num_classes=10, fusion="bogus")
