"""timm `maxvit_*_tf_*` state_dicts <-> our MaxViT variables.

timm's TF-flavoured MaxViT is a port of the official weights, so apart from
names only layouts differ: PyTorch OIHW convolutions (-> HWIO), (out, in)
linears (-> (in, out)), a fused `qkv` linear whose rows are [q | k | v], each
head-major ([3, heads, head_dim], timm `head_first=False`), and `proj` whose
input is head-major as well.  Relative bias tables are [heads, 2P-1, 2P-1] in
both.  BatchNorm running statistics go to `batch_stats`.
"""
from __future__ import annotations

import re

import numpy as np

from vit_jax.weights import core

Flat = dict[str, np.ndarray]

_MBCONV = {"pre_norm": "pre_norm", "expand_conv": "conv1_1x1", "expand_norm": "norm1",
           "depthwise_conv": "conv2_kxk", "depthwise_norm": "norm2", "se_reduce": "se.fc1",
           "se_expand": "se.fc2", "shrink_conv": "conv3_1x1", "shortcut_conv": "shortcut.expand"}
_ATTN = {"attn_norm": "norm1", "mlp_norm": "norm2", "mlp/Dense_0": "mlp.fc1", "mlp/Dense_1": "mlp.fc2",
         "attention/out": "attn.proj"}
_TOP = {"stem_conv1": "stem.conv1", "stem_norm": "stem.norm1", "stem_conv2": "stem.conv2",
        "head_norm": "head.norm", "pre_logits": "head.pre_logits.fc", "head": "head.fc"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_QKV = ("query", "key", "value")


def _module_name(path: str) -> str | None:
  """Our module path (no collection, no leaf) -> timm module name."""
  if path in _TOP:
    return _TOP[path]
  m = re.fullmatch(r"block_(\d+)_(\d+)/(\w+)/(.+)", path)
  if not m:
    return None
  stage, block, layer, rest = m.groups()
  prefix = f"stages.{stage}.blocks.{block}"
  if layer == "mbconv":
    return f"{prefix}.conv.{_MBCONV[rest]}" if rest in _MBCONV else None
  sub = {"block_attn": "attn_block", "grid_attn": "attn_grid"}.get(layer)
  if sub is None:
    return None
  if rest == "relative_bias":
    return f"{prefix}.{sub}.attn.rel_pos.relative_position_bias_table"
  if rest.startswith("attention/") and rest.split("/")[1] in _QKV:
    return f"{prefix}.{sub}.attn.qkv"
  return f"{prefix}.{sub}.{_ATTN[rest]}" if rest in _ATTN else None


def timm_name(key: str) -> str | None:
  """'params/block_0_0/mbconv/expand_conv/kernel' -> 'stages.0.blocks.0.conv.conv1_1x1.weight'."""
  collection, rest = key.split("/", 1)
  if rest.endswith("/relative_bias"):
    return _module_name(rest)
  path, leaf = rest.rsplit("/", 1)
  module = _module_name(path)
  return None if module is None or leaf not in _LEAF else f"{module}.{_LEAF[leaf]}"


def _to_ours(key: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One timm array -> our layout for `key` whose shape is `shape` (raw when it cannot fit)."""
  leaf = key.rsplit("/", 1)[-1]
  parts = key.split("/")
  try:
    if len(parts) >= 3 and parts[-2] in _QKV:   # slice of the fused qkv
      which = _QKV.index(parts[-2])
      if leaf == "kernel":   # (3C', C) -> [C, heads, dh]
        heads, dh = shape[1], shape[2]
        return array.reshape(3, heads, dh, array.shape[1])[which].transpose(2, 0, 1)
      return array.reshape(3, *shape)[which]
    if parts[-2] == "out" and leaf == "kernel":   # (C, heads*dh) -> [heads, dh, C]
      return array.T.reshape(shape)
    if leaf == "kernel" and array.ndim == 4:       # OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C))
      return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
      return array.T
  except ValueError:
    pass
  return array


def _to_timm(key: str, array: np.ndarray) -> np.ndarray:
  leaf = key.rsplit("/", 1)[-1]
  parts = key.split("/")
  if parts[-2] == "out" and leaf == "kernel":     # [heads, dh, C] -> (C, heads*dh)
    return array.reshape(-1, array.shape[-1]).T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  return array


# ----------------------------------------------------------------------------- converter

def detect(flat: Flat) -> bool:
  return "stem.conv1.weight" in flat and any(k.endswith("rel_pos.relative_position_bias_table") for k in flat)


def to_variables(flat: Flat, model) -> Flat:
  expected = core.abstract_variables(model)
  out: Flat = {}
  used = set()
  for key, spec in expected.items():
    name = timm_name(key)
    if name is None or name not in flat:
      continue   # reported as missing by check_against
    used.add(name)
    out[key] = _to_ours(key, np.asarray(flat[name], np.float32), tuple(spec.shape))
  # Anything else in the checkpoint (but the BN step counters) is reported, not dropped in silence.
  for name in sorted(set(flat) - used):
    if not name.endswith("num_batches_tracked"):
      out[f"timm:{name}"] = np.asarray(flat[name])
  return out


def from_variables(flat: Flat, model) -> Flat:
  state: Flat = {}
  for key, value in flat.items():
    name = timm_name(key)
    if name is None:
      raise ValueError(f"variable {key!r} has no timm MaxViT counterpart.")
    value = np.asarray(value, np.float32)
    parts = key.split("/")
    if len(parts) >= 3 and parts[-2] in _QKV:
      continue   # fused below
    state[name] = _to_timm(key, value)
    if name.endswith("running_var"):
      state[name[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  # Fuse query/key/value into qkv: rows [q | k | v], each head-major.
  for key in flat:
    parts = key.split("/")
    if len(parts) >= 3 and parts[-2] == "query":
      base, leaf = "/".join(parts[:-2]), parts[-1]
      qkv = [np.asarray(flat[f"{base}/{p}/{leaf}"], np.float32) for p in _QKV]
      if leaf == "kernel":   # [C, heads, dh] -> (3*heads*dh, C)
        state[timm_name(key)] = np.concatenate([w.reshape(w.shape[0], -1).T for w in qkv], 0)
      else:
        state[timm_name(key)] = np.concatenate([b.reshape(-1) for b in qkv], 0)
  return state


core.register_converter("maxvit", "timm", detect, to_variables, from_variables)
