"""The one step that fits converted weights to a target model (every family, every format).

Converters only rename and reshape (`weights/<format>.py`).  What may
legitimately differ between a checkpoint and the model it is loaded into is
adapted here, driven by the target's abstract variables (as big_vision's
`load` / `merge_params` and timm's `resample_abs_pos_embed`):

  layers     loop <-> scan layout: `X_{i}/rest` (one entry per layer) <-> `X/rest` with a
             leading layer axis, whichever the target has
  head       a representation layer (`pre_logits`) the model lacks is dropped, and so is a head
             when the model has none (num_classes=0); the family's head modules are replaced by a zero head (bias `head_bias_init` where the model has one)
             when their class count differs or the checkpoint has none (the official
             fine-tuning policy)
  posemb     learned position embeddings (`model.position_embeddings()`: name -> grid, prefix
             tokens) are resized to the model's grid, bilinear (official ViT) or bicubic (timm);
             a table without the class-token row (big_vision) gets a zero row
  rel. bias  `*/relative_bias` tables [heads, 2h-1, 2w-1] are resized to the model's window
             (TF bilinear, as the official MaxViT code)
  patch      a patch-embedding kernel (the family's `patch_kernels`) of another patch size is
             resampled to the model's (`patch_resize="pi"`: FlexiViT's pseudo-inverse resize, big_vision
             `resample_patchemb`): with the patch size p -> p' >= p, a patch bilinearly resized to p'
             gives the very token the original kernel gave the original patch; p' < p is the
             least-squares best such kernel

and finally every key and shape is checked: `CheckpointMismatchError` names
each missing, unexpected and mis-shaped key.  Nothing loads partially.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from vit_jax.models import layers

Flat = dict[str, np.ndarray]
POSEMB_RESIZE_METHODS = ("bilinear", "bicubic")
PATCH_RESIZE_METHODS = ("pi",)
_NUMBERED = re.compile(r"^(.*)_(\d+)$")


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model (names the keys/shapes and what was expected)."""


# ----------------------------------------------------------------------------- loop / scan layouts

def _splits(key: str):
  """(stem, rest) for every '/' boundary of `key`: 'a/b/c' -> ('a', 'b/c'), ('a/b', 'c')."""
  parts = key.split("/")
  for j in range(1, len(parts)):
    yield "/".join(parts[:j]), "/".join(parts[j:])


def match_layout(flat: Mapping[str, Any], expected: Mapping[str, Any]) -> Flat:
  """Stacks `stem_{i}/rest` into `stem/rest` or unstacks the other way, wherever `expected` has the other."""
  out = dict(flat)
  for key in [k for k in expected if k not in out]:  # target scanned, checkpoint looped
    for stem, rest in _splits(key):
      looped = {int(m.group(2)): k for k in out
                for m in [_NUMBERED.match(k[:-len(rest) - 1])] if k.endswith("/" + rest) and m
                and m.group(1) == stem}
      if not looped:
        continue
      depth = expected[key].shape[0] if expected[key].shape else 0
      if set(looped) == set(range(depth)):  # else left as it is: reported by the key check
        out[key] = np.stack([np.asarray(out.pop(looped[i])) for i in range(depth)])
      break
  for key in [k for k in out if k not in expected]:  # checkpoint scanned, target looped
    for stem, rest in _splits(key):
      if f"{stem}_0/{rest}" in expected:
        stacked = np.asarray(out.pop(key))
        for i, value in enumerate(stacked):
          out[f"{stem}_{i}/{rest}"] = value
        break
  return out


def _layer_indices(keys) -> dict[str, set[int]]:
  """'params/Transformer/encoderblock_3/x' -> {'params/Transformer/encoderblock': {3}} over all keys."""
  found: dict[str, set[int]] = {}
  for key in keys:
    parts = key.split("/")
    for j, part in enumerate(parts[:-1]):
      m = _NUMBERED.match(part)
      if m:
        found.setdefault("/".join(parts[:j] + [m.group(1)]), set()).add(int(m.group(2)))
  return found


def layer_count_hints(converted: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """One line per stack of numbered layers whose count differs between checkpoint and model."""
  ours, theirs = _layer_indices(expected), _layer_indices(converted)
  for key, spec in expected.items():  # a scanned stack counts its leading axis
    for stem, rest in _splits(key):
      if stem in theirs and stem not in ours and spec.shape:
        ours[stem] = set(range(spec.shape[0]))
        break
  hints = []
  for stem in sorted(set(ours) & set(theirs), key=lambda s: (not s.startswith("params/"), s)):
    if ours[stem] != theirs[stem]:
      have = sorted(theirs[stem])
      hints.append(f"the checkpoint has {len(have)} {stem}_* layers ({stem}_{have[0]}..{stem}_{have[-1]}) but "
                   f"the model has {len(ours[stem])}: pass the checkpoint's depth (or the model name it was "
                   "trained as)")
  return hints


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


def check_resize_method(method: str) -> None:
  if method not in POSEMB_RESIZE_METHODS:
    raise ValueError(f"posemb_resize must be one of {POSEMB_RESIZE_METHODS}, got {method!r}.")


def resize_posemb(posemb, *, grid: tuple[int, int], num_prefix: int, method: str) -> np.ndarray:
  """[1, (p+)h*w, D] from a checkpoint -> [1, num_prefix + gh*gw, D] for the model, prefix rows kept.

  A checkpoint table without the class-token row although the model has one
  (big_vision, timm `no_embed_class`) gets a zero row: the class token then
  receives no position embedding, exactly as in those models.
  """
  check_resize_method(method)
  posemb = np.asarray(posemb, np.float32)
  if posemb.ndim == 2:
    posemb = posemb[None]
  tokens, width = posemb.shape[1], posemb.shape[2]
  for prefix in dict.fromkeys((num_prefix, 0, 1)):
    source_grid = _grid_for(tokens - prefix, grid) if tokens > prefix else None
    if source_grid is not None:
      break
  else:
    raise CheckpointMismatchError(
        f"cannot tell the patch grid of the checkpoint's position embedding {tuple(posemb.shape)} "
        f"(neither square nor of the model's aspect ratio {grid[0]}x{grid[1]}).")
  prefix_rows = posemb[:, :prefix][:, :num_prefix]
  prefix_rows = np.concatenate([prefix_rows, np.zeros((1, num_prefix - prefix_rows.shape[1], width),
                                                      np.float32)], axis=1)
  table = posemb[0, prefix:].reshape(source_grid + (width,))
  if source_grid != tuple(grid):
    table = np.asarray(layers.resize_grid(table, tuple(grid), method))
  return np.concatenate([prefix_rows, table.reshape(1, -1, width)], axis=1)


# ----------------------------------------------------------------------------- patch embeddings

def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in]: 1-D linear resampling with half-pixel centres and clamped edges, no antialiasing
  (`tf.image.resize(..., "bilinear")`, the resize of the input pipeline and of big_vision's FlexiViT)."""
  matrix = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    x = (i + 0.5) * n_in / n_out - 0.5
    x0 = math.floor(x)
    frac = x - x0
    matrix[i, min(max(x0, 0), n_in - 1)] += 1.0 - frac
    matrix[i, min(max(x0 + 1, 0), n_in - 1)] += frac
  return matrix


def bilinear_resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
  """[new_h * new_w, old_h * old_w]: bilinear resize of a row-major flattened [h, w] patch."""
  return np.kron(linear_resize_matrix(old_hw[0], new_hw[0]), linear_resize_matrix(old_hw[1], new_hw[1]))


def resample_patch_kernel(kernel, new_hw: tuple[int, int], method: str = "pi") -> np.ndarray:
  """[ph, pw, in, out] -> [new_h, new_w, in, out] (FlexiViT PI-resize, big_vision `resample_patchemb`):
  new = pinv(B^T) old per (in, out) channel, B the bilinear resize from the old patch size to the new."""
  if method not in PATCH_RESIZE_METHODS:
    raise ValueError(f"patch_resize must be one of {PATCH_RESIZE_METHODS} or None, got {method!r}.")
  kernel = np.asarray(kernel)
  old_hw, new_hw = tuple(kernel.shape[:2]), tuple(new_hw)
  if old_hw == new_hw:
    return kernel
  resize = bilinear_resize_matrix(old_hw, new_hw)
  flat = kernel.astype(np.float64).reshape(old_hw[0] * old_hw[1], -1)
  out = np.linalg.pinv(resize.T) @ flat
  return out.reshape(new_hw + kernel.shape[2:]).astype(kernel.dtype if kernel.dtype.kind == "f" else np.float32)


# ----------------------------------------------------------------------------- the step

def fit_to_model(converted: Mapping[str, Any], model, expected: Mapping[str, Any], *, head: tuple[str, ...],
                 posemb_resize: str, patch_kernels: tuple[str, ...] = (), patch_resize: str | None = "pi",
                 report: list | None = None) -> Flat:
  """Converted flat variables ('params/...', 'batch_stats/...') -> exactly the variables of `model`.

  `expected` is `model`'s flat abstract variables; `head` its family's head modules; `patch_kernels` its
  patch-embedding kernels, resampled by `patch_resize` (None: a patch size that differs is a mismatch).
  `report` (a list) receives one line per adaptation made (head reset, resizes).
  """
  check_resize_method(posemb_resize)
  notes = [] if report is None else report
  out = match_layout({k: np.asarray(v) for k, v in converted.items()}, expected)

  reset = any(k.startswith("params/pre_logits/") for k in out) and \
      not any(k.startswith("params/pre_logits/") for k in expected)
  if reset:
    out = {k: v for k, v in out.items() if not k.startswith("params/pre_logits/")}
    notes.append("representation layer pre_logits dropped")
  for name in head:
    kernel, bias = f"params/{name}/kernel", f"params/{name}/bias"
    if kernel not in expected:  # a model without a head (num_classes=0, features): drop the checkpoint's
      out = {k: v for k, v in out.items() if not k.startswith(f"params/{name}/")}
      continue
    if reset or kernel not in out or np.shape(out[kernel])[-1] != expected[kernel].shape[-1]:
      notes.append(f"new zero-initialised {name} of {expected[kernel].shape[-1]} classes"
                   + (f" (the checkpoint's has {np.shape(out[kernel])[-1]})" if kernel in out else ""))
      out[kernel] = np.zeros(expected[kernel].shape, np.float32)
      out[bias] = np.full(expected[bias].shape, getattr(model, "head_bias_init", 0.0), np.float32)

  for name, (grid, num_prefix) in model.position_embeddings().items():
    key = f"params/{name}"
    if key in out:
      before = np.shape(out[key])
      out[key] = resize_posemb(out[key], grid=grid, num_prefix=num_prefix, method=posemb_resize)
      if tuple(before) != tuple(out[key].shape):
        notes.append(f"{name.split('/')[-1]} {before[-2] if len(before) > 1 else before[0]} -> "
                     f"{out[key].shape[1]} tokens ({grid[0]}x{grid[1]} grid, {posemb_resize})")

  for name in patch_kernels:
    key = f"params/{name}"
    value, spec = out.get(key), expected.get(key)
    if patch_resize and value is not None and spec is not None and value.ndim == 4 \
        and value.shape[:2] != tuple(spec.shape[:2]) and value.shape[2:] == tuple(spec.shape[2:]):
      out[key] = resample_patch_kernel(value, tuple(spec.shape[:2]), patch_resize)
      notes.append(f"{name} {value.shape[0]}x{value.shape[1]} -> {spec.shape[0]}x{spec.shape[1]} patches "
                   f"({patch_resize}-resize)")

  for key, spec in expected.items():
    value = out.get(key)
    if key.endswith("/relative_bias") and value is not None and value.ndim == 3 \
        and value.shape != tuple(spec.shape) and value.shape[0] == spec.shape[0]:
      out[key] = layers.resize_relative_bias(value, ((spec.shape[1] + 1) // 2, (spec.shape[2] + 1) // 2))

  what = f"{type(model).__name__} (image_size={model.image_size}, num_classes={model.num_classes})"
  check_against(out, expected, what, hints=layer_count_hints(out, expected))
  return out


def check_against(converted: Mapping[str, Any], expected: Mapping[str, Any], what: str,
                  hints: list[str] = ()) -> None:
  """Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(converted))
  unexpected = sorted(set(converted) - set(expected))
  wrong = [(k, tuple(np.shape(converted[k])), tuple(expected[k].shape))
           for k in sorted(set(expected) & set(converted))
           if tuple(np.shape(converted[k])) != tuple(expected[k].shape)]
  if not (missing or unexpected or wrong):
    return
  lines = [f"The checkpoint does not fit {what}:"]
  if missing:
    lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:12])
                 + (" ..." if len(unexpected) > 12 else ""))
  for k, got, want in wrong[:12]:
    lines.append(f"  {k}: checkpoint has shape {got}, the model expects {want}")
  lines += [f"  {hint}" for hint in hints]
  lines.append("  Is this a checkpoint for another model? Pass the matching `model=` "
               "(see vit_jax.list_models()) and its options.")
  raise CheckpointMismatchError("\n".join(lines))
