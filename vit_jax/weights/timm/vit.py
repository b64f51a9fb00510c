"""timm `VisionTransformer` state_dicts (vit_*_patch*, vit_*_r50_*, vit_small_r26_s32_*, ...) <-> our ViT.

timm fuses query/key/value into one `qkv` Linear ([3*D, D], rows q|k|v, each
head-major), stores Linear weights as [out, in] and convolutions as OIHW.  The
hybrids' ResNet-v2 lives under `patch_embed.backbone` (`stem.conv`/`stem.norm`
and `stages.{s}.blocks.{u}.{conv,norm}{1,2,3}` plus `downsample.{conv,norm}`;
a stem-only backbone, R+ViT-Ti, has `conv`/`norm` directly).

Known numerical differences of timm's hybrid port (not of the weights): its
StdConv divides by sqrt(var + 1e-8) where the official code divides by
std + 1e-5, and its GroupNorm epsilon is 1e-5 where flax's is 1e-6.  A
'gap' model corresponds to timm with `class_token=False, global_pool='avg',
fc_norm=False` (official ViT normalises the tokens before pooling); timm has no
representation (pre_logits) layer.
"""
from __future__ import annotations

import re

import numpy as np

from vit_jax.weights import core

Flat = dict[str, np.ndarray]

_BACKBONE = "patch_embed.backbone."
_BLOCK_PARAMS = {  # timm suffix inside blocks.{i} -> ours inside encoderblock_{i}
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    "attn.proj.weight": "MultiHeadDotProductAttention_0/out/kernel",
    "attn.proj.bias": "MultiHeadDotProductAttention_0/out/bias",
}
_TOP_PARAMS = {
    "cls_token": "cls", "pos_embed": "Transformer/posembed_input/pos_embedding",
    "patch_embed.proj.weight": "embedding/kernel", "patch_embed.proj.bias": "embedding/bias",
    "norm.weight": "Transformer/encoder_norm/scale", "norm.bias": "Transformer/encoder_norm/bias",
    "head.weight": "head/kernel", "head.bias": "head/bias",
}
_NORM = {"weight": "scale", "bias": "bias"}


def _strip(flat: Flat) -> Flat:
  if flat and all(k.startswith("module.") for k in flat):  # saved from DataParallel
    return {k[len("module."):]: v for k, v in flat.items()}
  return dict(flat)


def detect(flat: Flat) -> bool:
  flat = _strip(flat)
  return "patch_embed.proj.weight" in flat and any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in flat)


def _linear(w):  # torch [out, in] -> flax [in, out]
  return np.asarray(w).T


def _conv(w):  # OIHW -> HWIO
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def _backbone_to_ours(rest: str, value) -> tuple[str, np.ndarray] | None:
  """`patch_embed.backbone.<rest>` -> (our name, value), None for a name we do not know."""
  m = re.match(r"^(?:stem\.)?(conv|norm)\.(weight|bias)$", rest)
  if m:
    return ("conv_root/kernel", _conv(value)) if m.group(1) == "conv" else (f"gn_root/{_NORM[m.group(2)]}", value)
  m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(?:(conv|norm)(\d)|downsample\.(conv|norm))\.(weight|bias)$", rest)
  if not m:
    return None
  stage, unit, kind, idx, proj_kind, param = m.groups()
  prefix = f"block{int(stage) + 1}/unit{int(unit) + 1}/"
  kind = kind or proj_kind
  suffix = idx if idx else "_proj"
  if kind == "conv":
    return prefix + f"conv{suffix}/kernel", _conv(value)
  return prefix + f"gn{suffix}/{_NORM[param]}", value


def to_variables(flat: Flat, model) -> Flat:
  """timm names -> ours ('params/...', loop layout); keys we do not know keep their timm names (reported)."""
  flat = _strip(flat)
  if "fc_norm.weight" in flat:
    raise core.CheckpointMismatchError(
        "this timm checkpoint normalises after pooling (fc_norm, timm global_pool='avg' default); our ViT "
        "follows the official code (encoder_norm before pooling), so it cannot be loaded exactly.")
  heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if m:
      block, rest = f"Transformer/encoderblock_{m.group(1)}/", m.group(2)
      attn = block + "MultiHeadDotProductAttention_0/"
      if rest == "attn.qkv.weight":
        width = value.shape[1]
        for name, w in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
          out[attn + f"{name}/kernel"] = w.T.reshape(width, heads, -1)
      elif rest == "attn.qkv.bias":
        for name, b in zip(("query", "key", "value"), np.split(value, 3)):
          out[attn + f"{name}/bias"] = b.reshape(heads, -1)
      elif rest == "attn.proj.weight":
        out[attn + "out/kernel"] = value.T.reshape(heads, head_dim, -1)
      elif rest in _BLOCK_PARAMS:
        out[block + _BLOCK_PARAMS[rest]] = _linear(value) if rest.endswith("fc1.weight") or \
            rest.endswith("fc2.weight") else value
      else:
        out[key] = value
    elif key.startswith(_BACKBONE):
      mapped = _backbone_to_ours(key[len(_BACKBONE):], value)
      out.update([mapped] if mapped else [(key, value)])
    elif key in _TOP_PARAMS:
      if key == "patch_embed.proj.weight":
        value = _conv(value)
      elif key == "head.weight":
        value = _linear(value)
      out[_TOP_PARAMS[key]] = value
    else:
      out[key] = value
  return {f"params/{k}": v for k, v in out.items()}


# ----------------------------------------------------------------------------- export

def _ours_to_backbone(name: str, value: np.ndarray, stem_only: bool) -> tuple[str, np.ndarray]:
  stem = "" if stem_only else "stem."
  if name == "conv_root/kernel":
    return f"{_BACKBONE}{stem}conv.weight", _conv_back(value)
  m = re.match(r"^gn_root/(scale|bias)$", name)
  if m:
    return f"{_BACKBONE}{stem}norm.{'weight' if m.group(1) == 'scale' else 'bias'}", value
  m = re.match(r"^block(\d+)/unit(\d+)/(conv|gn)(\d|_proj)/(kernel|scale|bias)$", name)
  if not m:
    raise ValueError(f"unexpected hybrid parameter {name!r}.")
  stage, unit, kind, idx, param = m.groups()
  prefix = f"{_BACKBONE}stages.{int(stage) - 1}.blocks.{int(unit) - 1}."
  module = ("downsample." + ("conv" if kind == "conv" else "norm")) if idx == "_proj" else \
      ("conv" if kind == "conv" else "norm") + idx
  if kind == "conv":
    return prefix + module + ".weight", _conv_back(value)
  return prefix + module + (".weight" if param == "scale" else ".bias"), value


def _conv_back(w):  # HWIO -> OIHW
  return np.transpose(np.asarray(w), (3, 2, 0, 1))


def from_variables(flat: Flat, model) -> Flat:
  """Our variables (flat, 'params/...', loop layout) -> a timm VisionTransformer state_dict (numpy)."""
  if model.classifier == "map":
    raise ValueError("timm's attention pooling (global_pool='map') has other parameter names; a model with "
                     "classifier='map' cannot be exported to timm.")
  if model.representation_size is not None:
    raise ValueError("timm's VisionTransformer has no representation (pre_logits) layer; a model with "
                     "representation_size cannot be exported to timm.")
  if model.posemb != "learn":
    raise ValueError("timm's VisionTransformer has a learned position embedding; posemb='sincos2d' "
                     "cannot be exported exactly.")
  params = {k[len("params/"):]: np.asarray(v, np.float32) for k, v in flat.items() if k.startswith("params/")}
  stem_only = model.resnet is not None and not tuple(model.resnet[0])
  top = {ours: theirs for theirs, ours in _TOP_PARAMS.items()}
  state = {}
  for name, value in params.items():
    m = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", name)
    if m:
      block, rest = f"blocks.{m.group(1)}.", m.group(2)
      am = re.match(r"^MultiHeadDotProductAttention_0/(query|key|value)/(kernel|bias)$", rest)
      if am:
        continue  # fused below
      if rest == "MultiHeadDotProductAttention_0/out/kernel":
        state[block + "attn.proj.weight"] = value.reshape(-1, value.shape[-1]).T
        continue
      theirs = {v: k for k, v in _BLOCK_PARAMS.items()}[rest]
      state[block + theirs] = value.T if theirs.endswith(("fc1.weight", "fc2.weight")) else value
    elif name in top:
      if name == "embedding/kernel":
        value = _conv_back(value)
      elif name == "head/kernel":
        value = value.T
      state[top[name]] = value
    else:
      key, value = _ours_to_backbone(name, value, stem_only)
      state[key] = value
  for i in range(model.depth):
    attn = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/"
    state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
        [params[attn + f"{n}/kernel"].reshape(model.hidden_size, -1).T for n in ("query", "key", "value")])
    state[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
        [params[attn + f"{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
  return state


core.register_converter("vit", "timm", detect, to_variables, from_variables)
