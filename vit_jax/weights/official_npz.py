"""Official ViT checkpoints (.npz of google-research/vision_transformer, AugReg, big_vision) -> our ViT.

Handles, in this order:
  * an optional `opt/target/` (old optimizer wrapper) or `params/` (flax / big_vision) key prefix;
  * pre-linen block names (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) and linen ones;
  * scan layout (`Transformer/encoderblock/...` with a leading depth axis, big_vision) and loop layout;
  * big_vision's top-level `pos_embedding` without a class-token row (the class token then has no
    position embedding, which equals a zero row in our layout);
  * old GroupNorm scale/bias stored as (1, 1, 1, C).
`finalize` (shared with the timm converter) then adapts what may legitimately differ from the
model: the head (zero-initialised when the class count differs or an unused pre_logits layer is
dropped), the position-embedding grid (resized, class-token row kept) and the scan/loop layout.
Anything else that differs is left for `core.check_against` to report: nothing loads partially.
"""
from __future__ import annotations

import math
import re

import numpy as np

from vit_jax.models import layers
from vit_jax.weights import core

Flat = dict[str, np.ndarray]

PREFIXES = ("opt/target/", "params/")
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Pre-linen numbering (one counter per parent) -> linen numbering (one counter per class).
PRE_LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
POSEMB_RESIZE_METHODS = ("bilinear", "bicubic")
_LOOP_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCAN_BLOCK = "Transformer/encoderblock/"


def strip_prefix(flat: Flat) -> Flat:
  for prefix in PREFIXES:
    if any(k.startswith(prefix + "embedding/") for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return dict(flat)


def detect(flat: Flat) -> bool:
  flat = strip_prefix(flat)
  return "embedding/kernel" in flat and any(k.startswith("Transformer/") for k in flat)


def checkpoint_num_classes(flat: Flat) -> int | None:
  head = strip_prefix(flat).get("head/bias")
  return None if head is None else int(np.shape(head)[-1])


# ----------------------------------------------------------------------------- layouts

def scan_to_loop(flat: Flat) -> Flat:
  """`Transformer/encoderblock/x` [depth, ...] -> `Transformer/encoderblock_{i}/x` (other keys unchanged)."""
  out = {}
  for k, v in flat.items():
    if k.startswith(_SCAN_BLOCK):
      rest = k[len(_SCAN_BLOCK):]
      for i in range(np.shape(v)[0]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = np.asarray(v[i])
    else:
      out[k] = v
  return out


def loop_to_scan(flat: Flat, depth: int) -> Flat:
  """Stacks `Transformer/encoderblock_{i}/x` into `Transformer/encoderblock/x` when all `depth` blocks hold x.

  Keys of a checkpoint with another depth stay as they are, so the key check names them.
  """
  groups: dict[str, dict[int, np.ndarray]] = {}
  out = {}
  for k, v in flat.items():
    m = _LOOP_BLOCK.match(k)
    if m:
      groups.setdefault(m.group(2), {})[int(m.group(1))] = v
    else:
      out[k] = v
  for rest, by_index in groups.items():
    shapes = {np.shape(a) for a in by_index.values()}
    if set(by_index) == set(range(depth)) and len(shapes) == 1:
      out[_SCAN_BLOCK + rest] = np.stack([np.asarray(by_index[i]) for i in range(depth)])
    else:
      out.update({f"Transformer/encoderblock_{i}/{rest}": a for i, a in by_index.items()})
  return out


# ----------------------------------------------------------------------------- position embeddings

def _grid_for(tokens: int, model_grid: tuple[int, int]) -> tuple[int, int] | None:
  """(rows, cols) of a checkpoint grid with `tokens` entries: square, or the model's aspect ratio."""
  side = math.isqrt(tokens)
  if side * side == tokens:
    return side, side
  gh, gw = model_grid
  for rows in range(1, tokens + 1):
    if tokens % rows == 0 and rows * gw == (tokens // rows) * gh:
      return rows, tokens // rows
  return None


def adapt_posemb(posemb: np.ndarray, *, has_cls: bool, model_grid: tuple[int, int], method: str) -> np.ndarray:
  """[1, (1+)h*w, D] from a checkpoint -> [1, (1+)gh*gw, D] for the model, class-token row kept.

  A checkpoint whose table has no class-token row although it has a class token
  (big_vision, timm `no_embed_class`) gets a zero row: the class token then
  receives no position embedding, exactly as in those models.
  """
  if method not in POSEMB_RESIZE_METHODS:
    raise ValueError(f"posemb_resize must be one of {POSEMB_RESIZE_METHODS}, got {method!r}.")
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim == 2:
    posemb = posemb[None]
  tokens, width = posemb.shape[1], posemb.shape[2]
  for prefix in ((1, 0) if has_cls else (0,)):
    grid = _grid_for(tokens - prefix, model_grid) if tokens > prefix else None
    if grid is not None:
      break
  else:
    raise core.CheckpointMismatchError(
        f"cannot tell the patch grid of the checkpoint's position embedding {tuple(posemb.shape)} "
        f"(neither square nor of the model's aspect ratio {model_grid[0]}x{model_grid[1]}).")
  cls_row = posemb[:, :1] if prefix else np.zeros((1, 1, width), np.float32)
  table = posemb[0, prefix:].reshape(grid + (width,))
  if grid != tuple(model_grid):
    table = np.asarray(layers.resize_grid(table, tuple(model_grid), method))
  table = table.reshape(1, -1, width)
  return np.concatenate([cls_row, table], axis=1) if has_cls else table


# ----------------------------------------------------------------------------- shared finishing step

def finalize(params: Flat, model, posemb_resize: str = "bilinear") -> Flat:
  """Official-layout (loop, linen names, no prefix) params -> flat 'params/...' variables for `model`."""
  params = {k: np.asarray(v) for k, v in params.items()}
  num_classes = model.num_classes
  blocks = {int(m.group(1)) for m in map(_LOOP_BLOCK.match, params) if m}
  if blocks and blocks != set(range(model.depth)):
    raise core.CheckpointMismatchError(
        f"the checkpoint has {len(blocks)} encoder blocks (encoderblock_{min(blocks)}..{max(blocks)}) but the model "
        f"has depth={model.depth}; pass the checkpoint's depth (or the model name it was trained as).")

  # An unused representation layer is dropped; the head trained on top of it is meaningless then.
  reset_head = False
  if model.representation_size is None and any(k.startswith("pre_logits/") for k in params):
    params = {k: v for k, v in params.items() if not k.startswith("pre_logits/")}
    reset_head = True
  head_in = model.representation_size or model.hidden_size
  if "head/kernel" in params:
    head_in = np.shape(params["head/kernel"])[0]
    reset_head = reset_head or np.shape(params["head/kernel"])[-1] != num_classes
  else:
    reset_head = True
  if reset_head:
    params["head/kernel"] = np.zeros((head_in, num_classes), np.float32)
    params["head/bias"] = np.full((num_classes,), model.head_bias_init, np.float32)

  if POSEMB_KEY in params and model.posemb == "learn":
    params[POSEMB_KEY] = adapt_posemb(params[POSEMB_KEY], has_cls="cls" in params,
                                      model_grid=model.grid_size, method=posemb_resize)

  if model.scan:
    params = loop_to_scan(params, model.depth)
  return {f"params/{k}": v for k, v in params.items()}


# ----------------------------------------------------------------------------- the npz format

def to_official_layout(flat: Flat) -> Flat:
  """Any accepted npz key layout -> loop layout with linen names, no prefix."""
  flat = strip_prefix(flat)
  if any(k.startswith("MAPHead_0/") for k in flat):
    raise core.CheckpointMismatchError(
        "this big_vision checkpoint uses the MAP pooling head (MAPHead_0), which our ViT does not "
        "implement; only 'token' and 'gap' classifiers are supported.")
  flat = scan_to_loop(flat)
  out = {}
  for k, v in flat.items():
    parts = k.split("/")
    if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = PRE_LINEN.get(parts[2], parts[2])
    name = "/".join(parts)
    if re.search(r"(^|/)gn[^/]*/(scale|bias)$", name) and np.ndim(v) == 4:
      v = np.reshape(v, (-1,))  # flax < 0.3.6 stored GroupNorm params as (1, 1, 1, C)
    out[name] = v
  if "pos_embedding" in out:  # big_vision keeps the table at the top level
    out[POSEMB_KEY] = out.pop("pos_embedding")
  return out


def to_variables(flat: Flat, model, posemb_resize: str = "bilinear") -> Flat:
  return finalize(to_official_layout(flat), model, posemb_resize)


core.register_converter("vit", "official_npz", detect, to_variables, num_classes=checkpoint_num_classes)
