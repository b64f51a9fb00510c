"""Analytic MAC formulas of the three families, from their configuration fields (tests only).

`vit_jax.flops` counts the MACs of any model from its jaxpr; these independent
formulas (moved here from the package) pin that count exactly in
tests/test_flops.py, term by term.  They count what the jaxpr counts: every
matmul and convolution of one forward pass per image, including CrossViT's
in-model bicubic resize of branch 1 (and the grid resampling of its `pairwise`
fusion), which is the `resize` term; the papers and timm leave that term out.
"""
from __future__ import annotations

import math
from typing import Sequence

from vit_jax.models import registry


def macs_terms(model) -> dict[str, int]:
  """Per-image forward MACs of a model built by `vit_jax.get_model`, by component."""
  family = registry.get_family(model).name
  if family == "vit":
    return _vit_terms(model)
  if family == "crossvit":
    return _crossvit_terms(model)
  if family == "maxvit":
    return _maxvit_terms(model)
  raise ValueError(f"no FLOP formula for model family {family!r}.")


def paper_macs(model) -> int:
  """The papers' / timm's convention: every term but CrossViT's `resize`."""
  return sum(v for k, v in macs_terms(model).items() if k != "resize")


def _pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _conv_out(size: int, kernel: int, stride: int, padding: int | str) -> int:
  if padding == "SAME":
    return -(-size // stride)
  return (size + 2 * padding - kernel) // stride + 1


def transformer_block_macs(tokens: int, width: int, mlp_dim: int, kv_tokens: int | None = None) -> int:
  """Pre-norm encoder block: q/k/v/out projections, QK^T and AV, two-layer MLP."""
  kv_tokens = tokens if kv_tokens is None else kv_tokens
  projections = (tokens + 2 * kv_tokens + tokens) * width * width
  attention = 2 * tokens * kv_tokens * width
  mlp = 2 * tokens * width * mlp_dim
  return projections + attention + mlp


# ------------------------------------------------------------------------------------------ ViT


def resnetv2_macs(image_size, num_layers: Sequence[int], width_factor: float) -> tuple[int, tuple[int, int], int]:
  """MACs of the hybrid ResNet-v2 root + stages (official `models_resnet.py`).

  Returns (macs, (h, w) of the output feature map, its channel count).
  """
  h, w = _pair(image_size)
  width = int(64 * width_factor)
  # conv_root: 7x7 stride 2 SAME, 3 -> width; then max-pool 3x3 stride 2 SAME.
  h, w = _conv_out(h, 7, 2, "SAME"), _conv_out(w, 7, 2, "SAME")
  macs = h * w * width * 7 * 7 * 3
  h, w = _conv_out(h, 3, 2, "SAME"), _conv_out(w, 3, 2, "SAME")
  channels = width
  for stage, units in enumerate(num_layers):
    features = width * 2 ** stage
    for unit in range(units):
      stride = 2 if (stage > 0 and unit == 0) else 1
      ho, wo = _conv_out(h, 3, stride, "SAME"), _conv_out(w, 3, stride, "SAME")
      macs += h * w * channels * features                 # conv1 1x1
      macs += ho * wo * features * 9 * features           # conv2 3x3 (strided)
      macs += ho * wo * features * 4 * features           # conv3 1x1
      if channels != 4 * features or stride != 1:
        macs += ho * wo * channels * 4 * features         # conv_proj 1x1 (strided)
      h, w, channels = ho, wo, 4 * features
  return macs, (h, w), channels


def vit_macs(*, image_size, patch_size, hidden_size: int, depth: int, mlp_dim: int, num_classes: int,
             classifier: str = "token", representation_size: int | None = None,
             resnet_layers: Sequence[int] | None = None, resnet_width: float = 1.0,
             in_channels: int = 3) -> dict[str, int]:
  """Per-image MACs of a (hybrid) Vision Transformer, by component."""
  terms = {}
  h, w = _pair(image_size)
  if resnet_layers is not None:
    terms["resnet"], (h, w), in_channels = resnetv2_macs((h, w), resnet_layers, resnet_width)
  ph, pw = _pair(patch_size)
  gh, gw = h // ph, w // pw
  patches = gh * gw
  terms["embedding"] = patches * hidden_size * ph * pw * in_channels
  tokens = patches + (1 if classifier in ("token", "token_unpooled") else 0)
  terms["encoder"] = depth * transformer_block_macs(tokens, hidden_size, mlp_dim)
  features = hidden_size
  if representation_size:
    terms["pre_logits"] = hidden_size * representation_size
    features = representation_size
  terms["head"] = features * num_classes
  return terms


# ------------------------------------------------------------------------------------- CrossViT


def _crossvit_patch_embed_macs(size: int | tuple[int, int], patch: int, dim: int, multi_conv: bool) -> int:
  h, w = _pair(size)
  if not multi_conv:
    return (h // patch) * (w // patch) * dim * patch * patch * 3
  # The dagger (multi-conv) embedding of the official code: 7x7/4 -> 3x3/(3|2) -> 3x3/(1|2).
  if patch == 12:
    convs = ((7, 4, 3, 3, dim // 4), (3, 3, 0, dim // 4, dim // 2), (3, 1, 1, dim // 2, dim))
  elif patch == 16:
    convs = ((7, 4, 3, 3, dim // 4), (3, 2, 1, dim // 4, dim // 2), (3, 2, 1, dim // 2, dim))
  else:
    raise ValueError(f"the multi-conv (dagger) patch embedding exists for patch 12 and 16, not {patch}.")
  macs = 0
  for kernel, stride, pad, cin, cout in convs:
    h, w = _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad)
    macs += h * w * cout * kernel * kernel * cin
  return macs


def crossvit_macs(*, branch_sizes: Sequence, patch_sizes: Sequence[int], dims: Sequence[int],
                  depths: Sequence[int], num_blocks: int, mlp_ratios: Sequence[float], num_classes: int,
                  cross_depth: int = 1, multi_conv: bool = False, fusion: str = "cross_attention",
                  image_size=None) -> dict[str, int]:
  """Per-image MACs of CrossViT (IBM / timm architecture), by component.

  `branch_sizes`: input (h, w) of the two branches (240 and 224 for the *_240
  models); `depths`: (N, M) branch blocks per multi-scale block; `num_blocks`: K;
  `cross_depth`: L stacked cross-attention modules per direction.  `image_size`
  (the model input) is needed for the `resize` term only.  Grid resampling in
  the pairwise fusion also counts as `resize`.
  """
  terms = {"embedding": 0, "encoder": 0, "fusion": 0, "head": 0, "resize": 0}
  tokens, grids = [], []
  for size, patch, dim in zip(branch_sizes, patch_sizes, dims):
    h, w = _pair(size)
    grids.append((h // patch, w // patch))
    tokens.append((h // patch) * (w // patch) + 1)
    terms["embedding"] += _crossvit_patch_embed_macs(size, patch, dim, multi_conv)
  for b in (0, 1):
    mlp_dim = int(dims[b] * mlp_ratios[b])
    terms["encoder"] += num_blocks * depths[b] * transformer_block_macs(tokens[b], dims[b], mlp_dim)
  fusion_macs, resample_macs = _crossvit_fusion_macs(fusion, tokens, grids, dims, cross_depth)
  terms["fusion"] = num_blocks * fusion_macs
  terms["resize"] = num_blocks * resample_macs
  terms["head"] = (dims[0] + dims[1]) * num_classes
  if image_size is not None:
    terms["resize"] += sum(resize_macs(image_size, size) for size in branch_sizes)
  return terms


def _crossvit_fusion_macs(fusion: str, tokens: Sequence[int], grids: Sequence[tuple[int, int]],
                          dims: Sequence[int], cross_depth: int) -> tuple[int, int]:
  """(MACs, grid-resampling MACs) of one multi-scale block's fusion (paper section 3.3 / Table 6)."""
  d0, d1 = dims
  if fusion == "none":
    return 0, 0
  if fusion == "cross_attention":
    macs = 0
    for i in (0, 1):
      j = 1 - i
      macs += 2 * dims[i] * dims[j]  # f_i on the own CLS (D_i -> D_j) and g_i back (D_j -> D_i)
      # The CLS is the only query; keys/values: the other branch's tokens (and the CLS).
      # Stacked modules after the first see only the CLS the previous one returned.
      macs += transformer_block_macs(1, dims[j], 0, kv_tokens=tokens[j])
      macs += (cross_depth - 1) * transformer_block_macs(1, dims[j], 0, kv_tokens=1)
    return macs, 0
  # The heuristic fusions work in the L-branch width: f^S (D0 -> D1), g^S (D1 -> D0).
  if fusion == "class_token":
    return 2 * d0 * d1, 0
  if fusion == "pairwise":
    # f^S on the S tokens and on the S patches resampled to the L grid; g^S on all S tokens.
    macs = tokens[0] * d0 * d1 + (tokens[1] - 1) * d0 * d1 + tokens[0] * d1 * d0
    resample = (resize_macs(grids[1], grids[0], channels=d1) + resize_macs(grids[0], grids[1], channels=d0))
    return macs, resample
  if fusion == "all_attention":
    # One MSA (no MLP) over [L tokens || f^S(S tokens)], then g^S back on the S part.
    return tokens[0] * d0 * d1 + transformer_block_macs(tokens[0] + tokens[1], d1, 0) + tokens[0] * d1 * d0, 0
  raise ValueError(f"no FLOP formula for CrossViT fusion {fusion!r}; known: "
                   "'cross_attention', 'all_attention', 'class_token', 'pairwise', 'none'.")


def resize_macs(in_size, out_size, channels: int = 3) -> int:
  """A separable resize (`jax.image.scale_and_translate`) as two matmuls; 0 if no resize."""
  (hi, wi), (ho, wo) = _pair(in_size), _pair(out_size)
  if (hi, wi) == (ho, wo):
    return 0
  return channels * (ho * hi * wi + ho * wo * wi)


# --------------------------------------------------------------------------------------- MaxViT


def maxvit_macs(*, image_size, stem_width: int | Sequence[int], embed_dims: Sequence[int],
                depths: Sequence[int], window_size=None, mlp_ratio: float = 4.0, expand_ratio: float = 4.0,
                se_ratio: float = 0.25, head_hidden_size: int | None = -1, num_classes: int = 1000,
                block_order: Sequence[str] = ("mbconv", "block", "grid")) -> dict[str, int]:
  """Per-image MACs of MaxViT (official TF / timm `maxvit_*_tf_*`), by component.

  `window_size` (window = grid) defaults to image_size // 32; `head_hidden_size`
  -1 = the last width, None = no pre-logits layer.
  """
  h, w = _pair(image_size)
  window = _pair(window_size) if window_size is not None else (h // 32, w // 32)
  stem = _pair(stem_width)
  terms = {"stem": 0, "mbconv": 0, "attention": 0, "mlp": 0, "head": 0}
  # Stem: 3x3 stride-2 SAME conv, then 3x3 stride-1 conv.
  h, w = _conv_out(h, 3, 2, "SAME"), _conv_out(w, 3, 2, "SAME")
  terms["stem"] = h * w * stem[0] * 9 * 3 + h * w * stem[1] * 9 * stem[0]
  channels = stem[1]
  for dim, blocks in zip(embed_dims, depths):
    for block in range(blocks):
      for layer in block_order:
        if layer == "mbconv":
          stride = 2 if block == 0 else 1
          ho, wo = _conv_out(h, 3, stride, "SAME"), _conv_out(w, 3, stride, "SAME")
          mid = int(dim * expand_ratio)   # expansion and SE widths follow the *output* width
          se = max(1, int(dim * se_ratio))
          mb = h * w * channels * mid            # 1x1 expand (before the strided depthwise conv)
          mb += ho * wo * mid * 9                # depthwise 3x3
          mb += 2 * mid * se                     # squeeze-excite 1x1 convs on the pooled vector
          mb += ho * wo * mid * dim              # 1x1 shrink
          if channels != dim:
            mb += ho * wo * channels * dim       # shortcut 1x1 after the average pool
          terms["mbconv"] += mb
          h, w, channels = ho, wo, dim
        else:
          # Block (window) or grid attention over windows of window[0] x window[1] tokens,
          # each followed by its MLP; both run at the current width.
          tokens = h * w
          terms["attention"] += 4 * tokens * channels * channels + 2 * tokens * math.prod(window) * channels
          terms["mlp"] += 2 * tokens * channels * int(channels * mlp_ratio)
  if head_hidden_size is None:
    terms["head"] = channels * num_classes
  else:
    hidden = channels if head_hidden_size == -1 else head_hidden_size
    terms["head"] = channels * hidden + hidden * num_classes
  return terms



# ------------------------------------------------------------------------------ model fields


def _vit_terms(model) -> dict[str, int]:
  resnet = getattr(model, "resnet", None)
  layers, width = None, 1.0
  if resnet is not None:  # (stage depths, width factor), as vit.check_resnet
    layers, width = tuple(resnet[0]), float(resnet[1])
  return vit_macs(image_size=model.image_size, patch_size=model.patch_size, hidden_size=model.hidden_size,
                  depth=model.depth, mlp_dim=model.mlp_dim, num_classes=model.num_classes,
                  classifier=getattr(model, "classifier", "token"),
                  representation_size=getattr(model, "representation_size", None),
                  resnet_layers=layers, resnet_width=width)


def _crossvit_terms(model) -> dict[str, int]:
  return crossvit_macs(branch_sizes=model.branch_sizes(), patch_sizes=model.patch_sizes, dims=model.embed_dims,
                       depths=(model.small_depth, model.large_depth), num_blocks=model.num_multiscale_blocks,
                       cross_depth=model.cross_depth, mlp_ratios=model.mlp_ratios, num_classes=model.num_classes,
                       multi_conv=model.multi_conv, fusion=model.fusion, image_size=model.image_size)


def _maxvit_terms(model) -> dict[str, int]:
  return maxvit_macs(image_size=model.image_size, stem_width=model.stem_width, embed_dims=model.embed_dims,
                     depths=model.depths, window_size=model.windows(), mlp_ratio=model.mlp_ratio,
                     expand_ratio=model.expand_ratio, se_ratio=model.se_ratio,
                     head_hidden_size=model.head_hidden_size, num_classes=model.num_classes,
                     block_order=model.block_order)
