"""Official MaxViT TF checkpoints (google-research/maxvit) -> our MaxViT variables.

`read_source` reads a TF checkpoint prefix with `tf.train.load_checkpoint`;
this converter maps the Keras variable names of the official code
(`maxvit/block_00_00/mbconv/expand_conv/kernel`, `.../attention/q/weight`,
`.../attention_1/relative_bias`, ...) to ours.  When the checkpoint holds
exponential moving averages (`<name>/ExponentialMovingAverage`), those are
used, as the official evaluation does.  Layouts equal ours except the
depthwise kernel ([k, k, C, 1] -> [k, k, 1, C]).  The 384/512 checkpoints keep
13x13 relative-bias tables and resize them on the fly (TF bilinear); so do we,
once, at load time (the shared fit step).
"""
from __future__ import annotations

import re

import numpy as np

from vit_jax.weights import core

Flat = dict[str, np.ndarray]
EMA = "ExponentialMovingAverage"
_STEM_KEY = "stem/conv_0/kernel"
_MODEL_SCOPES = r"stem|block_\d+_\d+|final_layer_norm|cls_head"

_TOP = {"stem_conv1": "stem/conv_0", "stem_norm": "stem/norm_0", "stem_conv2": "stem/conv_1",
        "head_norm": "final_layer_norm", "pre_logits": "cls_head/inner_dense", "head": "cls_head/logit_dense"}
_MBCONV = {"se_reduce": "se/reduce_conv2d", "se_expand": "se/expand_conv2d"}   # others keep their names
_ATTN = {"attn_norm": "attn_layer_norm", "mlp_norm": "ffn_layer_norm", "mlp/Dense_0": "ffn/expand_dense",
         "mlp/Dense_1": "ffn/shrink_dense", "attention/query": "attention/q", "attention/key": "attention/k",
         "attention/value": "attention/v", "attention/out": "attention/o"}
_NORM_LEAF = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def _module_name(path: str) -> str | None:
  if path in _TOP:
    return _TOP[path]
  m = re.fullmatch(r"block_(\d+)_(\d+)/(\w+)/(.+)", path)
  if not m:
    return None
  stage, block, layer, rest = m.groups()
  prefix = f"block_{int(stage):02d}_{int(block):02d}"
  if layer == "mbconv":
    return f"{prefix}/mbconv/{_MBCONV.get(rest, rest)}"
  if layer not in ("block_attn", "grid_attn") or rest not in _ATTN:
    return None
  name = _ATTN[rest]
  if layer == "grid_attn":   # Keras numbers the second instance of each layer name: '_1'
    first, _, tail = name.partition("/")
    name = f"{first}_1" + (f"/{tail}" if tail else "")
  return f"{prefix}/{name}"


def tf_name(key: str) -> str | None:
  """'params/block_0_1/grid_attn/attention/query/kernel' -> 'block_00_01/attention_1/q/weight' (no prefix)."""
  _, rest = key.split("/", 1)
  if rest.endswith("/relative_bias"):
    module = _module_name(rest[:-len("/relative_bias")] + "/attention/query")
    return None if module is None else module.rsplit("/", 1)[0] + "/relative_bias"
  path, leaf = rest.rsplit("/", 1)
  module = _module_name(path)
  if module is None:
    return None
  last = module.rsplit("/", 1)[-1]
  if "norm" in last:
    return f"{module}/{_NORM_LEAF[leaf]}" if leaf in _NORM_LEAF else None
  if "dense" in last or last in ("q", "k", "v", "o"):
    return f"{module}/{'weight' if leaf == 'kernel' else leaf}"   # TrailDense
  if last == "depthwise_conv":
    return f"{module}/depthwise_kernel" if leaf == "kernel" else None
  return f"{module}/{leaf}"


def _prefix(flat: Flat) -> str | None:
  for name in flat:
    for suffix in (_STEM_KEY, f"{_STEM_KEY}/{EMA}"):
      if name.endswith(suffix):
        return name[:-len(suffix)]
  return None


def detect(flat: Flat) -> bool:
  return _prefix(flat) is not None


def to_variables(flat: Flat, model) -> Flat:
  expected = core.abstract_variables(model)
  prefix = _prefix(flat)
  out: Flat = {}
  used = set()
  for key, spec in expected.items():
    name = tf_name(key)
    if name is None:
      continue
    name = prefix + name
    source = f"{name}/{EMA}" if f"{name}/{EMA}" in flat else name
    if source not in flat:
      continue   # reported as missing by check_against
    used.add(name[len(prefix):])
    value = np.asarray(flat[source], np.float32)
    if key.endswith("depthwise_conv/kernel") and value.ndim == 4:
      value = value.transpose(0, 1, 3, 2)   # [k, k, C, 1] -> [k, k, 1, C]
    out[key] = value
  # Report model variables we do not know; ignore what belongs to a used variable
  # (its EMA, optimizer slots) and what lies outside the model (global_step, ...).
  for name in sorted(flat):
    parts = name[len(prefix):].split("/")
    if not name.startswith(prefix) or not re.fullmatch(_MODEL_SCOPES, parts[0]):
      continue
    if any("/".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
      continue
    out[f"tf:{name}"] = np.asarray(flat[name])
  return out


core.register_converter("maxvit", "tf", detect, to_variables)
