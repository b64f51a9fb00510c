"""Reading outside checkpoints and checking them against a model.

Every outside format has one converter module (`official_npz`, `timm/<family>`,
`ibm`, `tf_maxvit`).  A converter registers itself with `register_converter`:

  detect(flat)                -> bool: does this flat name->array mapping look like my format?
  to_variables(flat, model)   -> flat '/'-joined dict of our variables (e.g. 'params/head/kernel')
  from_variables(flat, model) -> flat dict in the outside format (optional; used by export)

`load_pretrained` reads the source, picks the converter by family and detected
format, converts, adapts what legitimately differs (head size, position
embedding grid, relative-bias tables: the converter does that, as it knows the
family) and finally checks every key and shape against the model's own
variables.  Nothing is loaded partially in silence.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import registry

Flat = dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model (names the keys/shapes and what was expected)."""


@dataclasses.dataclass(frozen=True)
class Converter:
  family: str
  fmt: str
  detect: Callable[[Flat], bool]
  to_variables: Callable[..., Flat]
  from_variables: Callable[[Flat, nn.Module], Flat] | None = None
  # Optional: the checkpoint's class count (used when load_pretrained gets num_classes=None).
  num_classes: Callable[[Flat], int | None] | None = None


_CONVERTERS: list[Converter] = []
_CONVERTER_MODULES = (
    "vit_jax.weights.official_npz", "vit_jax.weights.timm.vit", "vit_jax.weights.timm.crossvit",
    "vit_jax.weights.timm.maxvit", "vit_jax.weights.ibm", "vit_jax.weights.tf_maxvit")


def register_converter(family: str, fmt: str, detect, to_variables, from_variables=None, *,
                       num_classes=None) -> None:
  """`to_variables(flat, model)` may also accept keyword options of load_pretrained (e.g. `posemb_resize`)."""
  _CONVERTERS.append(Converter(family, fmt, detect, to_variables, from_variables, num_classes))


def converters(family: str | None = None) -> list[Converter]:
  registry.import_modules(_CONVERTER_MODULES)  # each registers itself on import
  return [c for c in _CONVERTERS if family is None or c.family == family]


# ----------------------------------------------------------------------------- trees

def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, key, sep))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def abstract_variables(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat '/'-joined shapes of `model`'s variables (no memory, no compute)."""
  size = getattr(model, "image_size", 224)
  h, w = (size, size) if isinstance(size, int) else size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return flatten(nn.meta.unbox(shapes))


# ----------------------------------------------------------------------------- reading

def read_source(source: str | os.PathLike | Mapping[str, Any]) -> Flat:
  """A flat name -> numpy array mapping from a path or a (possibly nested) mapping.

  `.npz` (official ViT/big_vision), `.safetensors`, `.pth`/`.pt`/`.bin` (PyTorch
  state_dicts, read with `weights_only=True`) and TF checkpoints (a path
  prefix with an `.index` file).  No pickles are ever executed.
  """
  if isinstance(source, Mapping):
    flat = flatten(source) if any(isinstance(v, Mapping) for v in source.values()) else dict(source)
    return {k: _to_numpy(v) for k, v in flat.items()}
  path = os.fspath(source)
  if os.path.exists(path + ".index") or (os.path.isdir(path) and _tf_checkpoint_prefix(path)):
    return _read_tf_checkpoint(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  lower = path.lower()
  if lower.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if lower.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  if lower.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs PyTorch (pip install torch); "
                        "a .safetensors file needs only the safetensors package.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
      if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
        state = state[wrapper]
        break
    return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
  raise ValueError(f"cannot tell the format of {path!r}: expected .npz (official ViT), .safetensors, "
                   ".pth/.pt/.bin (timm/PyTorch state_dict) or a TF checkpoint prefix.")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch tensor; bfloat16 has no numpy dtype
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _tf_checkpoint_prefix(directory: str) -> str | None:
  import glob
  index = sorted(glob.glob(os.path.join(directory, "*.index")))
  return index[-1][:-len(".index")] if index else None


def _read_tf_checkpoint(path: str) -> Flat:
  import tensorflow as tf
  prefix = _tf_checkpoint_prefix(path) if os.path.isdir(path) else path
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


# ----------------------------------------------------------------------------- checking

def check_against(converted: Flat, expected: Mapping[str, Any], what: str) -> None:
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
  lines.append("  Is this a checkpoint for another model? Pass the matching `model=` "
               "(see vit_jax.list_models()) and its options.")
  raise CheckpointMismatchError("\n".join(lines))


# ----------------------------------------------------------------------------- entry points

def _resolve_model(model: str | nn.Module, num_classes, image_size, overrides) -> nn.Module:
  if isinstance(model, nn.Module):
    if num_classes is not None or image_size is not None or overrides:
      model = model.clone(**{k: v for k, v in dict(overrides, num_classes=num_classes,
                                                     image_size=image_size).items() if v is not None})
    return model
  return registry.get_model(model, num_classes=1000 if num_classes is None else num_classes,
                            image_size=image_size, **overrides)


def checkpoint_num_classes(flat: Flat, model_name: str) -> int | None:
  """The class count of the checkpoint's head (None when its format cannot tell)."""
  family = registry.model_family(model_name)
  counts = [c.num_classes(flat) for c in converters(family) if c.num_classes and c.detect(flat)]
  return next((n for n in counts if n), None)


def load_pretrained(source, *, model: str | nn.Module, num_classes: int | None = None,
                    image_size=None, posemb_resize: str = "bilinear", **overrides) -> dict[str, Any]:
  """Variables for `model` from an official `.npz`, a timm/IBM state_dict or a TF checkpoint.

  The format is detected from the keys.  A head of another size is replaced by
  a zero-initialised head of `num_classes`; position embeddings (and MaxViT's
  relative-bias tables) are resized when `image_size` differs from the
  checkpoint's (`posemb_resize`: 'bilinear' as the official ViT code, or
  'bicubic' as timm).  With a model name and `num_classes=None` the head keeps
  the checkpoint's class count (1000 when the format cannot tell).  Returns
  `{'params': ..., ['batch_stats': ...]}` ready for
  `model.apply(variables, images, train=False)`.
  """
  flat = read_source(source)
  if num_classes is None and not isinstance(model, nn.Module):
    num_classes = checkpoint_num_classes(flat, model)
  module = _resolve_model(model, num_classes, image_size, overrides)
  family = registry.model_family(module.model_name)
  candidates = converters(family)
  matches = [c for c in candidates if c.detect(flat)]
  if not matches:
    formats = ", ".join(f"{c.fmt}" for c in candidates) or "none"
    other = [c for c in converters() if c.family != family and c.detect(flat)]
    hint = (f" It looks like a {other[0].family} checkpoint ({other[0].fmt}); pass a {other[0].family} model name."
            if other else "")
    raise CheckpointMismatchError(
        f"The checkpoint's keys match no format known for the {family} family ({formats}).{hint} "
        f"First keys: {sorted(flat)[:6]}")
  options = {"posemb_resize": posemb_resize}
  accepted = inspect.signature(matches[0].to_variables).parameters
  if posemb_resize != "bilinear" and "posemb_resize" not in accepted:
    raise TypeError(f"posemb_resize={posemb_resize!r} has no effect for {family} checkpoints "
                    f"({matches[0].fmt}); leave it at its default.")
  converted = matches[0].to_variables(flat, module, **{k: v for k, v in options.items() if k in accepted})
  expected = abstract_variables(module)
  check_against(converted, expected, f"model {module.model_name!r} ({family}, format {matches[0].fmt})")
  variables = unflatten({k: jnp.asarray(v, dtype=expected[k].dtype) for k, v in converted.items()})
  return variables


def export_timm(variables: Mapping[str, Any], *, model: str | nn.Module, path: str | None = None,
                **overrides) -> Flat:
  """A timm state_dict (numpy) for `variables`; also written to `path` (.safetensors) when given."""
  module = _resolve_model(model, None, None, overrides) if isinstance(model, nn.Module) else \
      _resolve_model(model, _num_classes(variables), None, overrides)
  family = registry.model_family(module.model_name)
  exporters = [c for c in converters(family) if c.fmt == "timm" and c.from_variables]
  if not exporters:
    raise NotImplementedError(f"no timm exporter for the {family} family.")
  state = exporters[0].from_variables(flatten(nn.meta.unbox(dict(variables))), module)
  state = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32) if np.asarray(v).dtype != np.int64
                                   else np.asarray(v)) for k, v in state.items()}
  if path is not None:
    from safetensors.numpy import save_file
    save_file(state, path)
  return state


def _num_classes(variables: Mapping[str, Any]) -> int:
  flat = flatten(nn.meta.unbox(dict(variables)))
  heads = [v for k, v in flat.items() if k.endswith("kernel") and "head" in k.split("/")[-2]]
  return int(np.shape(heads[-1])[-1]) if heads else 1000
