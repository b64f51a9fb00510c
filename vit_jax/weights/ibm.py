"""Official IBM CrossViT checkpoints (github.com/IBM/CrossViT releases, `crossvit_*_224.pth`).

They are raw state_dicts with timm's names except for the two ParameterLists:
`pos_embed.{i}` / `cls_token.{i}` instead of timm's `pos_embed_{i}` / `cls_token_{i}`
(timm's own `pretrained_filter_fn` does the same renaming).  The IBM `*_224` /
`*_384` names are timm's `*_240` / `*_408`: the models take 240 (408) pixel
inputs and resize branch 1 to 224 (384) inside.
"""
from __future__ import annotations

import re

from vit_jax.weights.core import Flat, register_converter

_TOKEN_KEY = re.compile(r"^(pos_embed|cls_token)\.(\d+)$")


def detect(flat: Flat) -> bool:
  return "pos_embed.0" in flat and "cls_token.0" in flat and any(k.startswith("blocks.0.projs.") for k in flat)


def to_timm_names(flat: Flat, model=None) -> Flat:
  del model
  return {_TOKEN_KEY.sub(r"\1_\2", k): v for k, v in flat.items()}


register_converter("crossvit", "ibm", detect, to_timm_names, then="timm")
