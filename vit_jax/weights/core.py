"""Reading outside checkpoints into a model, and writing them out again.

Every outside format has one converter module (`official_npz`, `timm/<family>`,
`ibm`, `tf_maxvit`), named in its family's record (`registry.Family.converters`)
and imported on first use.  A converter registers itself with `register_converter`:

  detect(flat)                -> bool: does this flat name->array mapping look like my format?
  to_variables(flat, model)   -> flat '/'-joined variables named as ours ('params/head/kernel', ...);
                                 it only renames and reshapes; keys it does not know are kept under
                                 a name that says where they came from (they are reported)
  from_variables(flat, model) -> flat dict in the outside format (optional; export)
  then                        -> the format whose converter runs next (IBM CrossViT = a renaming,
                                 then timm's)

`load_pretrained` reads the source, detects the format among its family's
converters, converts, and hands the result to the one shared fit step
(`weights/fit.py`: head, position embeddings, relative-bias tables, loop/scan
layout, key and shape check).  Nothing is loaded partially in silence.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax.models import registry
from vit_jax.weights import fit
from vit_jax.weights.fit import CheckpointMismatchError, check_against  # noqa: F401  (public names)

Flat = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Converter:
  family: str
  fmt: str
  detect: Callable[[Flat], bool]
  to_variables: Callable[[Flat, nn.Module], Flat]
  from_variables: Callable[[Flat, nn.Module], Flat] | None = None
  then: str | None = None


_CONVERTERS: list[Converter] = []


def register_converter(family: str, fmt: str, detect, to_variables, from_variables=None, *,
                       then: str | None = None) -> None:
  _CONVERTERS.append(Converter(family, fmt, detect, to_variables, from_variables, then))


def converters(family: str | None = None) -> list[Converter]:
  """The converters of `family` (all families when None); their modules are imported here."""
  for record in registry.families() if family is None else [registry.get_family(family)]:
    for module_name in record.converters:
      importlib.import_module(module_name)  # each registers itself on import
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


def abstract_variables(model: nn.Module) -> dict[str, Any]:
  """Flat '/'-joined shapes of `model`'s variables (no memory, no compute)."""
  return flatten(nn.meta.unbox(registry.abstract_variables(model)))


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


# ----------------------------------------------------------------------------- entry points

def _resolve_model(model: str | nn.Module, num_classes, image_size, overrides) -> nn.Module:
  if isinstance(model, nn.Module):
    changes = {k: v for k, v in dict(overrides, num_classes=num_classes, image_size=image_size).items()
               if v is not None}
    return model.clone(**changes) if changes else model
  return registry.get_model(model, num_classes=1000 if num_classes is None else num_classes,
                            image_size=image_size, **overrides)


def _convert(flat: Flat, module: nn.Module) -> tuple[Flat, str]:
  family = registry.get_family(module).name
  candidates = converters(family)
  matches = [c for c in candidates if c.detect(flat)]
  if not matches:
    formats = ", ".join(c.fmt for c in candidates) or "none"
    other = [c for c in converters() if c.family != family and c.detect(flat)]
    hint = (f" It looks like a {other[0].family} checkpoint ({other[0].fmt}); pass a {other[0].family} model name."
            if other else "")
    raise CheckpointMismatchError(
        f"The checkpoint's keys match no format known for the {family} family ({formats}).{hint} "
        f"First keys: {sorted(flat)[:6]}")
  converter, steps = matches[0], []
  while True:
    steps.append(converter.fmt)
    flat = converter.to_variables(flat, module)
    if converter.then is None:
      return flat, " -> ".join(steps)
    converter = next(c for c in candidates if c.fmt == converter.then)


def head_classes(flat: Mapping[str, Any], module: nn.Module) -> int | None:
  """The class count of the head in our-named flat variables (None when they hold no head)."""
  kernel = flat.get(f"params/{registry.get_family(module).head[0]}/kernel")
  return None if kernel is None else int(np.shape(kernel)[-1])


def load_model(source, *, model: str | nn.Module, num_classes: int | None = None, image_size=None,
               posemb_resize: str | None = None, **overrides) -> tuple[nn.Module, dict[str, Any]]:
  """`(module, variables)`: `load_pretrained`, plus the module it built (with the class count it chose)."""
  flat = read_source(source)
  module = _resolve_model(model, num_classes, image_size, overrides)
  converted, fmt = _convert(flat, module)
  if num_classes is None and not isinstance(model, nn.Module):
    classes = head_classes(converted, module)
    if classes and classes != module.num_classes:
      module = module.clone(num_classes=classes)
  family = registry.get_family(module)
  expected = abstract_variables(module)
  try:
    fitted = fit.fit_to_model(converted, module, expected, head=family.head,
                              posemb_resize=posemb_resize or family.posemb_resize)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{e}\n  (format: {fmt})") from None
  return module, unflatten({k: jnp.asarray(v, dtype=expected[k].dtype) for k, v in fitted.items()})


def load_pretrained(source, *, model: str | nn.Module, num_classes: int | None = None,
                    image_size=None, posemb_resize: str | None = None, **overrides) -> dict[str, Any]:
  """Variables for `model` from an official `.npz`, a timm/IBM state_dict or a TF checkpoint.

  The format is detected from the keys.  A head of another size is replaced by
  a zero-initialised head of `num_classes`; position embeddings (and MaxViT's
  relative-bias tables) are resized when `image_size` differs from the
  checkpoint's (`posemb_resize`: 'bilinear' as the official ViT code, or
  'bicubic' as timm; default: the family's, bicubic for CrossViT).  With a
  model name and `num_classes=None` the head keeps the checkpoint's class
  count.  Returns `{'params': ..., ['batch_stats': ...]}` ready for
  `model.apply(variables, images, train=False)`.
  """
  return load_model(source, model=model, num_classes=num_classes, image_size=image_size,
                    posemb_resize=posemb_resize, **overrides)[1]


def export_timm(variables: Mapping[str, Any], *, model: str | nn.Module, path: str | None = None,
                **overrides) -> Flat:
  """A timm state_dict (numpy) for `variables`; also written to `path` (.safetensors) when given."""
  flat = flatten(nn.meta.unbox(dict(variables)))
  if isinstance(model, nn.Module):
    module = _resolve_model(model, None, None, overrides)
  else:
    module = _resolve_model(model, 1000, None, overrides)
    module = module.clone(num_classes=head_classes(flat, module) or 1000)
  family = registry.get_family(module)
  exporters = [c for c in converters(family.name) if c.fmt == "timm" and c.from_variables]
  if not exporters:
    raise NotImplementedError(f"no timm exporter for the {family.name} family.")
  if getattr(module, "scan", False):  # timm has one module per layer
    module = module.clone(scan=False)
    flat = fit.match_layout(flat, abstract_variables(module))
  state = exporters[0].from_variables(flat, module)
  state = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32) if np.asarray(v).dtype != np.int64
                                   else np.asarray(v)) for k, v in state.items()}
  if path is not None:
    from safetensors.numpy import save_file
    save_file(state, path)
  return state
