"""timm `crossvit_*` state_dicts <-> vit_jax CrossViT variables.

timm layout (see timm/models/crossvit.py): `pos_embed_{i}`, `cls_token_{i}`,
`patch_embed.{i}.proj[.{0,2,4}]`, `blocks.{k}.blocks.{i}.{n}` (timm
vision_transformer.Block with fused `qkv`), `blocks.{k}.projs.{i}.{0,2}`,
`blocks.{k}.fusion.{i}[.{l}]` (separate `wq`/`wk`/`wv`/`proj`),
`blocks.{k}.revert_projs.{i}.{0,2}`, `norm.{i}`, `head.{i}`.

The IBM release names the tokens `pos_embed.{i}` / `cls_token.{i}`; `ibm.py`
renames those, then this converter runs (`then="timm"`).  Position embeddings
of another grid and heads of another size are left to the shared fit step.
"""
from __future__ import annotations

import numpy as np

from vit_jax.weights.core import CheckpointMismatchError, Flat, register_converter


def detect(flat: Flat) -> bool:
  return "pos_embed_0" in flat and "cls_token_1" in flat and any(k.startswith("blocks.0.projs.") for k in flat)


# ----------------------------------------------------------------------------- name mapping
# Each entry: (timm key, our key without the 'params/' prefix, kind, number of heads).
# kinds: weight (torch Linear, transposed), heads_in (Linear -> [in, heads, head_dim]),
# heads_out (Linear -> [heads, head_dim, out]), bias, heads_bias ([heads, head_dim]),
# conv (OIHW -> HWIO), copy, and qkv (one fused timm Linear -> our query/key/value).

def _layer_norm(timm, ours):
  return [(f"{timm}.weight", f"{ours}/scale", "copy", 0), (f"{timm}.bias", f"{ours}/bias", "copy", 0)]


def _linear(timm, ours):
  return [(f"{timm}.weight", f"{ours}/kernel", "weight", 0), (f"{timm}.bias", f"{ours}/bias", "copy", 0)]


def _names(model) -> list[tuple[str, str, str, int]]:
  if model.fusion != "cross_attention":
    raise CheckpointMismatchError(f"timm/IBM CrossViT checkpoints hold cross-attention fusion; the model uses "
                     f"fusion={model.fusion!r}. Build it with fusion='cross_attention' to load them.")
  entries = []
  for i in range(2):
    entries += [(f"pos_embed_{i}", f"pos_embed_{i}", "copy", 0), (f"cls_token_{i}", f"cls_token_{i}", "copy", 0)]
    convs = ["proj.0", "proj.2", "proj.4"] if model.multi_conv else ["proj"]
    for c, name in enumerate(convs):
      entries += [(f"patch_embed.{i}.{name}.weight", f"patch_embed_{i}/conv_{c}/kernel", "conv", 0),
                  (f"patch_embed.{i}.{name}.bias", f"patch_embed_{i}/conv_{c}/bias", "copy", 0)]
  depths = (model.small_depth, model.large_depth)
  for k in range(model.num_multiscale_blocks):
    tb, ob = f"blocks.{k}", f"multiscale_block_{k}"
    for i in range(2):
      heads = model.num_heads[i]
      for n in range(depths[i]):
        t, o = f"{tb}.blocks.{i}.{n}", f"{ob}/branch_{i}_block_{n}"
        entries += _layer_norm(f"{t}.norm1", f"{o}/norm1")
        entries += [(f"{t}.attn.qkv.weight", f"{o}/attn", "qkv", heads),
                    (f"{t}.attn.qkv.bias", f"{o}/attn", "qkv_bias", heads),
                    (f"{t}.attn.proj.weight", f"{o}/attn/out/kernel", "heads_out", heads),
                    (f"{t}.attn.proj.bias", f"{o}/attn/out/bias", "copy", 0)]
        entries += _layer_norm(f"{t}.norm2", f"{o}/norm2")
        entries += _linear(f"{t}.mlp.fc1", f"{o}/mlp/Dense_0") + _linear(f"{t}.mlp.fc2", f"{o}/mlp/Dense_1")
    for i in range(2):
      heads = model.num_heads[1 - i]   # fusion i runs in the other branch's width
      entries += _layer_norm(f"{tb}.projs.{i}.0", f"{ob}/proj_{i}/norm")
      entries += _linear(f"{tb}.projs.{i}.2", f"{ob}/proj_{i}/dense")
      for l in range(model.cross_depth):
        # Released configs (official depth[-1] == 0) hold one module, stored flat.
        t = f"{tb}.fusion.{i}" if model.cross_depth == 1 else f"{tb}.fusion.{i}.{l}"
        o = f"{ob}/fusion_{i}_{l}"
        entries += _layer_norm(f"{t}.norm1", f"{o}/norm")
        for timm_name, ours_name in (("wq", "query"), ("wk", "key"), ("wv", "value")):
          entries += [(f"{t}.attn.{timm_name}.weight", f"{o}/attn/{ours_name}/kernel", "heads_in", heads),
                      (f"{t}.attn.{timm_name}.bias", f"{o}/attn/{ours_name}/bias", "heads_bias", heads)]
        entries += [(f"{t}.attn.proj.weight", f"{o}/attn/out/kernel", "heads_out", heads),
                    (f"{t}.attn.proj.bias", f"{o}/attn/out/bias", "copy", 0)]
      entries += _layer_norm(f"{tb}.revert_projs.{i}.0", f"{ob}/revert_proj_{i}/norm")
      entries += _linear(f"{tb}.revert_projs.{i}.2", f"{ob}/revert_proj_{i}/dense")
  for i in range(2):
    entries += _layer_norm(f"norm.{i}", f"norm_{i}") + _linear(f"head.{i}", f"head_{i}")
  return entries


def _nested_fusion_keys(flat: Flat, model) -> Flat:
  """A one-module fusion saved by a timm model built with depth[-1] = 1 (`fusion.{i}.0.*`)."""
  if model.cross_depth != 1 or not any(".fusion.0.0." in k for k in flat):
    return flat
  return {k.replace(".fusion.0.0.", ".fusion.0.").replace(".fusion.1.0.", ".fusion.1."): v
          for k, v in flat.items()}


# ----------------------------------------------------------------------------- conversion

def _split_heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  out_dim, in_dim = w.shape
  return w.T.reshape(in_dim, heads, out_dim // heads)


def to_variables(flat: Flat, model) -> Flat:
  flat = _nested_fusion_keys(flat, model)
  out: Flat = {}
  names = _names(model)
  for timm_key, ours, kind, heads in names:
    if timm_key not in flat:
      continue  # reported as missing by the fit step
    w = np.asarray(flat[timm_key], np.float32)
    if kind == "copy":
      out[f"params/{ours}"] = w
    elif kind == "weight":
      out[f"params/{ours}"] = w.T
    elif kind == "conv":
      out[f"params/{ours}"] = w.transpose(2, 3, 1, 0)
    elif kind == "heads_in":
      out[f"params/{ours}"] = _split_heads_in(w, heads)
    elif kind == "heads_bias":
      out[f"params/{ours}"] = w.reshape(heads, -1)
    elif kind == "heads_out":
      in_dim = w.shape[1]
      out[f"params/{ours}"] = w.T.reshape(heads, in_dim // heads, w.shape[0])
    elif kind == "qkv":
      for name, part in zip(("query", "key", "value"), np.split(w, 3, axis=0)):
        out[f"params/{ours}/{name}/kernel"] = _split_heads_in(part, heads)
    elif kind == "qkv_bias":
      for name, part in zip(("query", "key", "value"), np.split(w, 3, axis=0)):
        out[f"params/{ours}/{name}/bias"] = part.reshape(heads, -1)
    else:  # pragma: no cover - the table above uses only the kinds handled here
      raise AssertionError(kind)
  # Tensors of the checkpoint the model has no place for are reported, not dropped in silence.
  known = {timm_key for timm_key, _, _, _ in names}
  out.update({f"timm:{k}": np.asarray(v) for k, v in flat.items() if k not in known})
  return out


def from_variables(flat: Flat, model) -> Flat:
  state: Flat = {}
  for timm_key, ours, kind, heads in _names(model):
    if kind == "qkv":
      parts = [np.asarray(flat[f"params/{ours}/{n}/kernel"]) for n in ("query", "key", "value")]
      state[timm_key] = np.concatenate([p.reshape(p.shape[0], -1).T for p in parts], axis=0)
      continue
    if kind == "qkv_bias":
      parts = [np.asarray(flat[f"params/{ours}/{n}/bias"]).reshape(-1) for n in ("query", "key", "value")]
      state[timm_key] = np.concatenate(parts, axis=0)
      continue
    w = np.asarray(flat[f"params/{ours}"])
    if kind == "copy":
      state[timm_key] = w
    elif kind == "weight":
      state[timm_key] = w.T
    elif kind == "conv":
      state[timm_key] = w.transpose(3, 2, 0, 1)
    elif kind == "heads_in":
      state[timm_key] = w.reshape(w.shape[0], -1).T
    elif kind == "heads_bias":
      state[timm_key] = w.reshape(-1)
    elif kind == "heads_out":
      state[timm_key] = w.reshape(-1, w.shape[-1]).T
    else:  # pragma: no cover
      raise AssertionError(kind)
  return state


register_converter("crossvit", "timm", detect, to_variables, from_variables)
