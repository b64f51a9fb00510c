"""Hugging Face transformers ViT (`ViTModel`, `ViTForImageClassification`) <-> our ViT.

The hub layout (what `save_pretrained` writes, also under transformers 5):

  [vit.]embeddings.cls_token / position_embeddings / patch_embeddings.projection.{weight,bias}
  [vit.]encoder.layer.{i}.layernorm_before / attention.attention.{query,key,value} /
        attention.output.dense / layernorm_after / intermediate.dense / output.dense
  [vit.]layernorm                     final LayerNorm (our Transformer/encoder_norm)
  pooler.dense                        ViTModel's pooler = our representation layer (pre_logits, tanh)
  classifier                          ViTForImageClassification's head (on the class token)

Linear weights are [out, in]; query/key/value are [heads * head_dim, width].  transformers 5's
in-memory names (`vit.layers.{i}.attention.q_proj`, `mlp.fc1`, ...) are read as well.  HF ViT uses
the exact GELU ("gelu") and LayerNorm epsilon 1e-12 (ours: 1e-6, the official value; the difference
is below 1e-6 on the logits of the parity fixtures).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from vit_jax.weights import core

Flat = dict[str, np.ndarray]

_V5 = (  # transformers 5 in-memory names -> hub names
    (r"^(vit\.)?layers\.", r"\1encoder.layer."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."), (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."))
_BLOCK = {  # hub suffix inside encoder.layer.{i} -> ours inside encoderblock_{i} (LayerNorms, biases of Linears)
    "layernorm_before.weight": "LayerNorm_0/scale", "layernorm_before.bias": "LayerNorm_0/bias",
    "layernorm_after.weight": "LayerNorm_1/scale", "layernorm_after.bias": "LayerNorm_1/bias",
    "intermediate.dense.weight": "MlpBlock_0/Dense_0/kernel", "intermediate.dense.bias": "MlpBlock_0/Dense_0/bias",
    "output.dense.weight": "MlpBlock_0/Dense_1/kernel", "output.dense.bias": "MlpBlock_0/Dense_1/bias",
    "attention.output.dense.weight": "MultiHeadDotProductAttention_0/out/kernel",
    "attention.output.dense.bias": "MultiHeadDotProductAttention_0/out/bias",
}
_TOP = {
    "embeddings.cls_token": "cls", "embeddings.position_embeddings": "Transformer/posembed_input/pos_embedding",
    "embeddings.patch_embeddings.projection.weight": "embedding/kernel",
    "embeddings.patch_embeddings.projection.bias": "embedding/bias",
    "layernorm.weight": "Transformer/encoder_norm/scale", "layernorm.bias": "Transformer/encoder_norm/bias",
    "pooler.dense.weight": "pre_logits/kernel", "pooler.dense.bias": "pre_logits/bias",
    "classifier.weight": "head/kernel", "classifier.bias": "head/bias",
}


def _normalise(flat: Flat) -> Flat:
  """Hub names without the `vit.` prefix of ViTForImageClassification (classifier/pooler stay top-level)."""
  out = {}
  for key, value in flat.items():
    for pattern, repl in _V5:
      key = re.sub(pattern, repl, key)
    out[key.removeprefix("vit.")] = value
  return out


def detect(flat: Flat) -> bool:
  return "embeddings.patch_embeddings.projection.weight" in _normalise(flat)


def to_variables(flat: Flat, model) -> Flat:
  """Hub names -> ours ('params/...', loop layout); keys we do not know keep their names (reported)."""
  heads = model.num_heads
  out = {}
  for key, value in _normalise(flat).items():
    value = np.asarray(value)
    m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
    if m:
      block, rest = f"Transformer/encoderblock_{m.group(1)}/", m.group(2)
      qkv = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
      if qkv:
        name = f"{block}MultiHeadDotProductAttention_0/{qkv.group(1)}/"
        out[name + ("kernel" if qkv.group(2) == "weight" else "bias")] = (
            value.T.reshape(value.shape[1], heads, -1) if qkv.group(2) == "weight" else value.reshape(heads, -1))
      elif rest == "attention.output.dense.weight":
        out[block + _BLOCK[rest]] = value.T.reshape(heads, -1, value.shape[0])
      elif rest in _BLOCK:
        out[block + _BLOCK[rest]] = value.T if rest.endswith("dense.weight") else value
      else:
        out[key] = value
    elif key in _TOP:
      if key.endswith("projection.weight"):
        value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
      elif key in ("pooler.dense.weight", "classifier.weight"):
        value = value.T
      out[_TOP[key]] = value
    else:
      out[key] = value
  return {f"params/{k}": v for k, v in out.items()}


def check_exportable(model) -> None:
  problems = []
  if model.resnet is not None:
    problems.append("a hybrid ResNet root (transformers' ViTHybrid is another model)")
  if model.classifier != "token":
    problems.append(f"classifier={model.classifier!r} (HF ViT classifies the class token)")
  if model.posemb != "learn":
    problems.append(f"posemb={model.posemb!r} (HF ViT has learned position embeddings)")
  if model.representation_size is not None and model.num_classes:
    problems.append("a representation layer before a head (HF has the pooler only in ViTModel, without a head)")
  if problems:
    raise ValueError("this model cannot be exported to Hugging Face transformers' ViT: " + "; ".join(problems) + ".")


def from_variables(flat: Flat, model) -> Flat:
  """Our variables (flat 'params/...', loop layout) -> the hub state_dict of ViTForImageClassification (a head),
  or of ViTModel (num_classes=0; with the pooler when the model has a representation layer)."""
  check_exportable(model)
  params = {k[len("params/"):]: np.asarray(v, np.float32) for k, v in flat.items() if k.startswith("params/")}
  prefix = "vit." if model.num_classes else ""
  ours = {v: k for k, v in _TOP.items()}
  state = {}
  for name, value in params.items():
    m = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", name)
    if m:
      block, rest = f"{prefix}encoder.layer.{m.group(1)}.", m.group(2)
      qkv = re.match(r"^MultiHeadDotProductAttention_0/(query|key|value)/(kernel|bias)$", rest)
      if qkv:
        theirs = f"attention.attention.{qkv.group(1)}." + ("weight" if qkv.group(2) == "kernel" else "bias")
        state[block + theirs] = value.reshape(value.shape[0], -1).T if qkv.group(2) == "kernel" else value.reshape(-1)
        continue
      theirs = {v: k for k, v in _BLOCK.items()}[rest]
      if rest == "MultiHeadDotProductAttention_0/out/kernel":
        value = value.reshape(-1, value.shape[-1]).T
      elif theirs.endswith("dense.weight"):
        value = value.T
      state[block + theirs] = value
      continue
    theirs = ours[name]
    if name == "embedding/kernel":
      value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    elif name in ("pre_logits/kernel", "head/kernel"):
      value = value.T
    state[theirs if theirs.startswith(("classifier", "pooler")) else prefix + theirs] = value
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


def config(model) -> dict:
  """The `config.json` of the exported model (transformers' ViTConfig)."""
  from vit_jax import labels
  from vit_jax.models import layers
  check_exportable(model)
  h, w = layers.to_2tuple(model.image_size)
  ph, pw = layers.to_2tuple(model.patch_size)
  if h != w or ph != pw:
    raise ValueError(f"HF ViT takes square images and patches; got image {h}x{w}, patch {ph}x{pw}.")
  cfg = {
      "architectures": ["ViTForImageClassification" if model.num_classes else "ViTModel"], "model_type": "vit",
      "hidden_size": model.hidden_size, "num_hidden_layers": model.depth, "num_attention_heads": model.num_heads,
      "intermediate_size": model.mlp_dim, "hidden_act": "gelu_pytorch_tanh" if model.approximate_gelu else "gelu",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
      "layer_norm_eps": 1e-6, "image_size": h, "patch_size": ph, "num_channels": 3, "qkv_bias": True,
      "encoder_stride": ph, "torch_dtype": "float32"}
  if model.num_classes:
    names = labels.class_names(model.num_classes) or [f"LABEL_{i}" for i in range(model.num_classes)]
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)} if len(set(names)) == len(names) else None
    if cfg["label2id"] is None:
      del cfg["label2id"]
  elif model.representation_size is not None:
    cfg.update(pooler_output_size=model.representation_size, pooler_act="tanh")
  return cfg


def save(state: Flat, model, directory: str) -> None:
  """Writes `model.safetensors` and `config.json` (loads with `from_pretrained(directory)`)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config(model), f, indent=2)


core.register_converter("vit", "transformers", detect, to_variables, from_variables)
