"""Official ViT checkpoints (.npz of google-research/vision_transformer, AugReg, big_vision) -> our ViT.

Only names and shapes change here:
  * an optional `opt/target/` (old optimizer wrapper) or `params/` (flax / big_vision) key prefix;
  * pre-linen block names (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) -> linen ones;
  * big_vision's top-level `pos_embedding` (no class-token row; older files: `Transformer/pos_embedding`)
    -> our position-embedding name;
  * big_vision's MAP head (`MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}`,
    our names too; early ViT-G files had it inlined at the top level) for `classifier="map"`;
  * old GroupNorm scale/bias stored as (1, 1, 1, C) -> (C,).
The scan layout of big_vision (`Transformer/encoderblock/...` with a leading depth axis), a head of
another size, an unused pre_logits layer and another position-embedding grid are handled by the
shared fit step (`weights/fit.py`), as for every format.
"""
from __future__ import annotations

import re

import numpy as np

from vit_jax.weights import core

Flat = dict[str, np.ndarray]

PREFIXES = ("opt/target/", "params/")
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Pre-linen numbering (one counter per parent) -> linen numbering (one counter per class).
PRE_LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def strip_prefix(flat: Flat) -> Flat:
  for prefix in PREFIXES:
    if any(k.startswith(prefix + "embedding/") for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return dict(flat)


def detect(flat: Flat) -> bool:
  flat = strip_prefix(flat)
  return "embedding/kernel" in flat and any(k.startswith("Transformer/") for k in flat)


def to_variables(flat: Flat, model) -> Flat:
  """Any accepted npz key layout -> our names ('params/...'), block layout as stored."""
  del model  # the npz names are ours already
  flat = strip_prefix(flat)
  if "probe" in flat:  # MAP head inlined at the top level (big_vision's fix_old_checkpoints)
    inlined = ("probe", "MlpBlock_0/", "MultiHeadDotProductAttention_0/", "LayerNorm_0/")
    flat = {(f"MAPHead_0/{k}" if k == "probe" or k.startswith(inlined[1:]) else k): v for k, v in flat.items()}
  out = {}
  for k, v in flat.items():
    parts = k.split("/")
    if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock"):
      parts[2] = PRE_LINEN.get(parts[2], parts[2])
    name = "/".join(parts)
    if re.search(r"(^|/)gn[^/]*/(scale|bias)$", name) and np.ndim(v) == 4:
      v = np.reshape(v, (-1,))  # flax < 0.3.6 stored GroupNorm params as (1, 1, 1, C)
    out[name] = v
  for old in ("pos_embedding", "Transformer/pos_embedding"):  # big_vision (now / before 2022)
    if old in out:
      out[POSEMB_KEY] = out.pop(old)
  return {f"params/{k}": v for k, v in out.items()}


core.register_converter("vit", "official_npz", detect, to_variables)
