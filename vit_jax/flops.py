"""FLOP counts of any model, read off its jaxpr, and the peak throughput of accelerators.

MFU needs the model's FLOPs per image.  XLA's `cost_analysis()` is no good for
that: it also counts element-wise work, and it under-counts under `remat`/`scan`
(jax issue #18672).  So, as MaxText does, we count the multiply-accumulates
(MACs) of every matmul and convolution of one forward pass:

  forward FLOPs / image  = 2 x MACs
  training FLOPs / image = 3 x forward FLOPs  (backward = 2 x forward)

The MACs are counted exactly, for every family alike, from the jaxpr of
`model.apply(variables, images, train=False)` traced on abstract variables and
one abstract image (`jax.make_jaxpr`: no memory, no compute; ViT-H/14 or
MaxViT-XL take a second or two): every `dot_general` counts output size x
contracted size, every convolution output size x kernel size per output
(depthwise convolutions included), scan bodies count `length` times.  Nothing
here knows about a model family, and there are no per-family formulas (the
analytic formulas live in the tests, `tests/flop_formulas.py`, where they pin
this count exactly).  Norms, softmax, activations, pooling and gathers (e.g.
MaxViT's relative-position-bias lookup) are not matmuls and are not counted.
The count at batch 2 is exactly twice the count at batch 1 for every
registered model (tested), so tracing one image gives the per-image count.
Attention is always counted on the XLA path of `jax.nn.dot_product_attention`
(a model set to `attention_implementation='cudnn'` is traced as 'xla': the
same products, but the fused cuDNN kernel is one opaque primitive).

The MACs equal what papers and timm (`infer_gmacs`) call "GFLOPs" (ViT-B/16 at
224 px: 17.56 G here, 17.58 G in timm, whose fvcore profiler also counts the
layer norms).  Two known differences, both outside the matmuls of the paper's
architecture:

* CrossViT resizes its input for branch 1 in the model (240 -> 224 px,
  bicubic, `jax.image.scale_and_translate`), and that resize *is* two matmuls
  in the jaxpr (rows, then columns), so it is counted: 3 x (224*240*240 +
  224*224*240) = 74.8 M MACs per image at 240 px (372 M at 408 -> 384 px).
  timm and the paper do not count it.  With it, the larger CrossViTs stay
  within 2% of the published numbers (S 5.690 vs 5.63 G, +1.1%; B +0.2%;
  15 / 18 / 15-dagger / 18-dagger +0.5..+1.0%; 15-dagger / 18-dagger at 408 px
  +1.5% / +1.0%), the smallest do not: Ti 1.638 vs 1.57 (+4.3%), 9 1.916 vs
  1.85 (+3.5%), 9-dagger 2.054 vs 1.99 (+3.2%).  Without it every CrossViT is
  within 0.6% (tests/test_models.py asserts 2% on that basis).  The grid resampling of the
  `pairwise` fusion ablation is counted too.
* The hybrid ResNet+ViT models: timm's fvcore count adds GroupNorm (5 per
  element) and the weight standardisation of every StdConv (4 per weight),
  about 0.1 G per model; R26+ViT-S/32 is 3.464 G here vs 3.56 G in timm
  (-2.7%), the others are within 1.5%.
"""
from __future__ import annotations

import math
from typing import Callable

# Peak dense bf16 throughput per chip, TFLOP/s (vendor data sheets; see
# benchmarks/README.md).  Matched against `device.device_kind`, first hit wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),  # 1,671 with 2:4 sparsity
    ("H100", 989.4),   # SXM5 / HBM3
    ("H200", 989.4),   # same compute as H100 SXM, more memory
    ("GH200", 989.4),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # plain "TPU v5" is what v5p reports
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of a device kind (e.g. 'NVIDIA H100 80GB HBM3'), or None if unknown (CPU)."""
  for key, value in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


# ------------------------------------------------------------------------------ model counts

_CACHE: dict = {}  # model (flax modules are hashable dataclasses) -> MACs


def model_macs(model, variables=None) -> int:
  """Per-image forward MACs of a model built by `vit_jax.get_model` (what papers call GFLOPs x 1e9).

  Counted from the jaxpr of `model.apply(variables, images, train=False)` on one
  abstract image.  `variables` (optional, boxed or not, arrays or
  `jax.ShapeDtypeStruct`s) saves deriving their shapes again; the result is
  cached per model configuration.
  """
  model = _counting_model(model)
  try:
    cached = _CACHE.get(model)
  except TypeError:  # a field that cannot be hashed (e.g. a list): count without the cache
    return _forward_macs(model, variables)
  if cached is None:
    cached = _CACHE[model] = _forward_macs(model, variables)
  return cached


def forward_flops(model) -> int:
  return 2 * model_macs(model)


def train_flops(model) -> int:
  """Forward + backward FLOPs per image (3 x forward), the MFU numerator of MaxText/PaLM."""
  return 3 * forward_flops(model)


def _counting_model(model):
  # The fused cuDNN attention is one primitive without a sub-jaxpr; the XLA path has the same products.
  if getattr(model, "attention_implementation", "xla") != "xla":
    model = model.clone(attention_implementation="xla")
  return model


def _forward_macs(model, variables) -> int:
  import flax.linen as nn
  from vit_jax.models import registry
  if variables is None:
    variables = registry.abstract_variables(model)
  variables = nn.meta.unbox(variables)
  return jaxpr_macs(lambda v, x: model.apply(v, x, train=False), variables, registry.input_spec(model, 1))


# ------------------------------------------------------------------------- the jaxpr count


def jaxpr_macs(fn: Callable, *args, **kwargs) -> int:
  """MACs of every dot_general / convolution in `fn(*args)`, by tracing (nothing runs).

  Arguments may be `jax.ShapeDtypeStruct`s; `fn` may also be a jaxpr already
  traced (`jax.make_jaxpr(f)(...)`, then no arguments).  Scan bodies count
  `length` times, both branches of a `cond` count their maximum, while-loops
  count once.
  """
  import jax
  if hasattr(fn, "eqns") or hasattr(getattr(fn, "jaxpr", None), "eqns"):
    if args or kwargs:
      raise TypeError("jaxpr_macs of a traced jaxpr takes no arguments.")
    return _count_jaxpr(getattr(fn, "jaxpr", fn))
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _count_jaxpr(closed.jaxpr)


def _count_jaxpr(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
      kernel = eqn.invars[1].aval.shape
      per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    else:
      total += _count_sub_jaxprs(eqn)
  return total


def _count_sub_jaxprs(eqn) -> int:
  subs = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
      if hasattr(inner, "eqns"):
        subs.append(_count_jaxpr(inner))
  if not subs:
    return 0
  if eqn.primitive.name == "cond":
    return max(subs)
  count = sum(subs)
  if eqn.primitive.name == "scan":
    count *= eqn.params["length"]
  return count
