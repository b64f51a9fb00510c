"""Looking inside a model: what the ViT paper's figures show, for every family.

    out = capture(model, variables, images)       # ViT/hybrid, CrossViT, MaxViT; scan=True too
    out["logits"], out["features"]                # as model.apply and registry.features give them
    for name, layer in out["layers"].items():     # every attention layer, in forward order
      layer.attention   # [batch, heads, queries, keys] float32 (MaxViT: [batch, windows, heads, q, k])
      layer.tokens      # [batch, tokens, width]: the output of the block that holds the attention
      layer.layout      # registry.AttentionLayout: kind, key grid, pixels per patch, class tokens

    mean_attention_distance(layer.attention, layout.grid, layout.patch_size, layout.num_prefix_tokens)
    attention_rollout([layer.attention for ...])  # Abnar & Zuidema (2020)
    posemb_similarity(posemb, grid)               # ViT paper Fig. 7 centre
    embedding_filters(variables["params"])        # ViT paper Fig. 7 left

The attention probabilities come from `layers.Attention`, which sows them into the
collection `layers.ATTENTION_WEIGHTS` only when an apply asks for it; the block outputs
come from Flax's `capture_intermediates`.  Neither changes the forward pass or the
parameters.  `python -m vit_jax.analyze` turns all of this into figures.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, registry

HEAD_FUSIONS = ("mean", "max", "min")


@dataclasses.dataclass
class LayerCapture:
  """One attention layer of one forward pass (host arrays)."""
  attention: np.ndarray          # [batch, heads, queries, keys] (MaxViT: [batch, windows, heads, q, k])
  tokens: np.ndarray | None      # [batch, tokens, width], the output of the layer's block
  layout: registry.AttentionLayout | None  # None: the family does not place this layer's tokens


def _sown(tree: Mapping[str, Any], name: str, path: tuple[str, ...] = ()):
  """(module path, value) of every `name` sown in a collection tree, e.g. ("Transformer", ...)."""
  for key, value in tree.items():
    if key == name:
      yield path, value
    elif isinstance(value, Mapping):
      yield from _sown(value, name, path + (key,))


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def capture(model: nn.Module, variables, images) -> dict[str, Any]:
  """Attention weights and output tokens of every attention layer of `model` on `images` (eval mode).

  Returns {"logits": [batch, classes], "features": [batch, width] (registry.features),
  "layers": {layer path: LayerCapture}} with the layers in forward order.  Layers of a
  `scan=True` stack are split and named as the unrolled model's ("Transformer/encoderblock_3").
  """
  images = jnp.asarray(images, jnp.float32)
  variables = nn.meta.unbox(variables)

  def attention_pass(v, x):
    return model.apply(v, x, train=False, mutable=[layers.ATTENTION_WEIGHTS, "intermediates"])

  # Two passes: returning the blocks' outputs as well can change XLA's fusion and so the last bits of the
  # logits; without them the logits equal model.apply's exactly.
  logits, state = jax.device_get(jax.jit(attention_pass)(variables, images))
  sown = list(_sown(state[layers.ATTENTION_WEIGHTS], "probs"))
  blocks = {path[:-1] for path, _ in sown}

  def tokens_pass(v, x):
    return model.apply(v, x, train=False, mutable=["intermediates"],
                       capture_intermediates=lambda module, method: method == "__call__"
                       and tuple(module.path) in blocks)[1]["intermediates"]

  block_outputs = jax.device_get(jax.jit(tokens_pass)(variables, images))
  batch = images.shape[0]
  found = []
  for path, probs in sown:
    block = path[:-1]
    tokens = _lookup(block_outputs, block)["__call__"][0]
    if isinstance(tokens, tuple) and len(tokens) == 2 and tokens[1] is None:
      tokens = tokens[0]  # a scan body's (carry, None)
    attention = np.asarray(probs[0], np.float32)
    if attention.ndim == 5:  # nn.scan: one stacked array per sown value, depth first
      names = [f"{'/'.join(block)}_{i}" for i in range(attention.shape[0])]
      per_layer = list(zip(names, attention, tokens if isinstance(tokens, np.ndarray) else [None] * len(names)))
    else:
      per_layer = [("/".join(block), attention, tokens if isinstance(tokens, np.ndarray) else None)]
    for name, weights, out in per_layer:
      layout = model.attention_layout(name) if hasattr(model, "attention_layout") else None
      if layout is not None and layout.kind in ("block", "grid"):
        weights = weights.reshape((batch, -1) + weights.shape[1:])  # windows are batch-major
      if out is not None:
        out = np.asarray(out, np.float32).reshape(batch, -1, out.shape[-1])
      found.append((name, LayerCapture(weights, out, layout)))
  found.sort(key=lambda item: (item[1].layout is None, item[1].layout.depth if item[1].layout else 0,
                               _natural_key(item[0])))
  features = state["intermediates"].get(registry.FEATURES)
  return {"logits": np.asarray(logits, np.float32),
          "features": None if features is None else np.asarray(features[0], np.float32),
          "layers": dict(found)}


# ----------------------------------------------------------------------------- attention distance

def _pixels(patch_size) -> tuple[float, float]:
  """(rows, columns) pixels per patch from a number or a pair (floats: resized branches are fractional)."""
  if np.ndim(patch_size) == 0:
    return float(patch_size), float(patch_size)
  rows, cols = (float(p) for p in patch_size)
  return rows, cols


def patch_distances(grid, patch_size) -> np.ndarray:
  """[gh*gw, gh*gw] Euclidean distances in pixels between the patch centres of a row-major grid."""
  gh, gw = layers.to_2tuple(grid)
  ph, pw = _pixels(patch_size)
  rows, cols = np.meshgrid(np.arange(gh) * ph, np.arange(gw) * pw, indexing="ij")
  points = np.stack([rows.ravel(), cols.ravel()], axis=-1)
  return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


def mean_attention_distance(attention, grid, patch_size, num_prefix_tokens: int = 1) -> np.ndarray:
  """Per head, the attention-weighted distance in pixels from each query patch to the patches it
  attends to, averaged over queries and images (ViT paper Fig. 7 right, "attention distance").

  attention: [..., heads, queries, keys] over `num_prefix_tokens` class tokens and then the
  row-major `grid`; the prefix tokens are left out as queries and as keys, and each query's
  weights on the patches are renormalised, so a head that mostly looks at the class token is
  judged by where the rest of its attention goes.  Returns [heads] (float64).
  """
  attention = np.asarray(attention, np.float64)
  gh, gw = layers.to_2tuple(grid)
  tokens = num_prefix_tokens + gh * gw
  if attention.ndim < 3 or attention.shape[-2:] != (tokens, tokens):
    raise ValueError(f"attention distance needs self-attention over {num_prefix_tokens} prefix token(s) and a "
                     f"{gh}x{gw} grid, i.e. [..., heads, {tokens}, {tokens}]; got {attention.shape}.")
  weights = attention[..., num_prefix_tokens:, num_prefix_tokens:]
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-12)
  per_query = np.einsum("...qk,qk->...q", weights, patch_distances((gh, gw), patch_size))
  heads = attention.shape[-3]
  return np.moveaxis(per_query, -2, 0).reshape(heads, -1).mean(axis=1)


def layer_attention_distance(layer: LayerCapture) -> np.ndarray | None:
  """`mean_attention_distance` of a captured layer ([heads]); None where queries are not patches
  (class-token cross-attention, layers without a layout)."""
  layout = layer.layout
  if layout is None or layout.kind == "cross":
    return None
  return mean_attention_distance(layer.attention, layout.grid, layout.patch_size, layout.num_prefix_tokens)


# ----------------------------------------------------------------------------- rollout and maps

def attention_rollout(attentions: Sequence[Any], head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020) through `attentions` ([batch, heads, T, T], first layer
  first): heads fused, per layer 0.5 * A + 0.5 * I (the residual), rows renormalised, multiplied
  through the layers.  `discard_ratio` zeroes that fraction of each example's weakest weights first
  (Gildenblat's variant).  Returns [batch, T, T]: row i = how much each input token flows into token i.
  """
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
  if not attentions:
    raise ValueError("attention_rollout needs at least one layer.")
  fuse = getattr(np, head_fusion)
  rollout = None
  for attention in attentions:
    attention = np.asarray(attention, np.float64)
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
      raise ValueError(f"rollout needs self-attention [batch, heads, T, T], got {attention.shape}.")
    fused = fuse(attention, axis=1)
    if discard_ratio:
      flat = fused.reshape(fused.shape[0], -1).copy()
      drop = int(flat.shape[1] * discard_ratio)
      np.put_along_axis(flat, np.argpartition(flat, drop, axis=1)[:, :drop], 0.0, axis=1)
      fused = flat.reshape(fused.shape)
    fused = 0.5 * fused + 0.5 * np.eye(fused.shape[-1])
    fused = fused / fused.sum(-1, keepdims=True)
    if rollout is not None and rollout.shape != fused.shape:
      raise ValueError(f"rollout layers must have the same shape; got {rollout.shape} and {fused.shape}.")
    rollout = fused if rollout is None else fused @ rollout
  return rollout.astype(np.float32)


def token_map(weights: np.ndarray, layout: registry.AttentionLayout) -> np.ndarray:
  """[batch, keys] weights (of one query) -> [batch, gh, gw] on the key grid (prefix keys left out)."""
  gh, gw = layout.grid
  return np.asarray(weights)[:, layout.num_prefix_tokens:].reshape(-1, gh, gw)


def rollout_map(rollout: np.ndarray, layout: registry.AttentionLayout) -> np.ndarray:
  """[batch, gh, gw]: what the class token gathers from each patch (without one: the mean over patches)."""
  if layout.num_prefix_tokens:
    return token_map(rollout[:, 0], layout)
  return token_map(rollout.mean(axis=1), layout)


def class_token_map(layer: LayerCapture) -> np.ndarray:
  """[batch, gh, gw]: the first query's attention (class token, MAP probe, CrossViT's fused class token)
  onto the patches, averaged over heads."""
  if layer.layout is None or layer.layout.kind not in ("self", "cross"):
    raise ValueError("class_token_map needs a 'self' or 'cross' layer with a layout.")
  return token_map(layer.attention[:, :, 0].mean(axis=1), layer.layout)


def query_map(layer: LayerCapture, row: int, col: int) -> np.ndarray:
  """[batch, H, W]: where the token at (row, col) looks, averaged over heads, on the whole map.

  For MaxViT ("block"/"grid") H, W is the stage's feature map and the weights lie on the query's
  window (block: its neighbours; grid: positions spread over the map); elsewhere they are 0.
  For "self" layers it is the key grid (the prefix tokens left out).
  """
  layout = layer.layout
  if layout is None or layout.kind == "cross":
    raise ValueError("query_map needs a 'self', 'block' or 'grid' layer with a layout.")
  if layout.kind == "self":
    gh, gw = layout.grid
    query = layout.num_prefix_tokens + row * gw + col
    return token_map(layer.attention[:, :, query].mean(axis=1), layout)
  (h, w), (wh, ww) = layout.feature_size, layout.grid
  attention = layer.attention.mean(axis=2)  # [batch, windows, q, k]
  out = np.zeros((attention.shape[0], h, w), np.float32)
  rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  if layout.kind == "block":  # windows of neighbours, row-major over the map
    window, query = (row // wh) * (w // ww) + col // ww, (row % wh) * ww + col % ww
    key_rows, key_cols = row // wh * wh + rows, col // ww * ww + cols
  else:  # grid: window (i, j) holds the positions (a * h/wh + i, b * w/ww + j)
    step_h, step_w = h // wh, w // ww
    window, query = (row % step_h) * step_w + col % step_w, (row // step_h) * ww + col // step_w
    key_rows, key_cols = rows * step_h + row % step_h, cols * step_w + col % step_w
  out[:, key_rows, key_cols] = attention[:, window, query].reshape(-1, wh, ww)
  return out


# ----------------------------------------------------------------------------- embeddings

def posemb_similarity(posemb, grid, size=None) -> np.ndarray:
  """Cosine similarity of every position embedding with every other: [gh, gw, gh, gw] (Fig. 7 centre).

  posemb: [1, N, D] or [N, D] with the class-token rows (if any) first: they are left out.
  `size` (rows, cols): resize the grid first, bilinearly as `load_pretrained` does, to see
  what a fine-tuning resolution inherits.
  """
  table = np.asarray(posemb, np.float32)
  table = table.reshape(-1, table.shape[-1])
  gh, gw = layers.to_2tuple(grid)
  if table.shape[0] < gh * gw:
    raise ValueError(f"a {gh}x{gw} grid needs {gh * gw} position embeddings, got {table.shape[0]}.")
  table = table[table.shape[0] - gh * gw:]
  if size is not None:
    gh, gw = layers.to_2tuple(size)
    table = np.asarray(layers.resize_grid(table.reshape(*layers.to_2tuple(grid), -1), (gh, gw)))
    table = table.reshape(gh * gw, -1)
  unit = table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
  return (unit @ unit.T).reshape(gh, gw, gh, gw)


@dataclasses.dataclass
class EmbeddingFilters:
  tiles: np.ndarray                     # [n, kh, kw, 3] in [0, 1], each component scaled on its own
  explained_variance_ratio: np.ndarray  # [n]


def embedding_filters(params, n: int = 28) -> dict[str, EmbeddingFilters]:
  """The top `n` principal components of each convolution that reads the RGB input, as RGB tiles.

  The ViT paper's Fig. 7 left shows them for the patch embedding (`embedding/kernel`); CrossViT
  has one per branch, hybrids and MaxViT show their first (stem) convolution.  Keyed by the
  kernel's parameter path.
  """
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
  out = {}
  for path, kernel in flat.items():
    if not (path.endswith("kernel") and kernel.ndim == 4 and kernel.shape[2] == 3):
      continue
    kh, kw, _, width = kernel.shape
    filters = kernel.reshape(-1, width).T  # one row per output channel
    filters = filters - filters.mean(axis=0)
    _, singular, components = np.linalg.svd(filters, full_matrices=False)
    count = min(n, components.shape[0])
    components = components[:count] * np.sign(components[:count].sum(axis=1, keepdims=True) + 1e-12)
    low, high = components.min(axis=1, keepdims=True), components.max(axis=1, keepdims=True)
    tiles = ((components - low) / np.maximum(high - low, 1e-12)).reshape(count, kh, kw, 3)
    variance = singular ** 2
    out[path] = EmbeddingFilters(tiles.astype(np.float32), (variance[:count] / variance.sum()).astype(np.float32))
  if not out:
    raise ValueError("no convolution kernel [h, w, 3, out] that reads RGB images in these parameters.")
  return out


def summarize_distances(distances: Mapping[str, np.ndarray]) -> list[str]:
  """One line per layer: min / median / max head distance in pixels."""
  width = max((len(name) for name in distances), default=0)
  return [f"{name:<{width}}  min {np.min(d):7.2f}  median {np.median(d):7.2f}  max {np.max(d):7.2f} px"
          for name, d in distances.items()]
