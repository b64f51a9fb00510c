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

`load_pretrained` resolves the source (a local path, a catalogue name or a
gs:// / https:// / hf-hub: URI, downloaded once into the cache: `weights/hub.py`,
`weights/catalog.py`), reads it, detects the format among its family's
converters, converts, and hands the result to the one shared fit step
(`weights/fit.py`: head, position embeddings, relative-bias tables, loop/scan
layout, key and shape check).  Nothing is loaded partially in silence.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax.models import registry
from vit_jax.weights import catalog, fit, hub, integrity
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
  """A flat name -> numpy array mapping from a path, a catalogue name, a URI or a (nested) mapping.

  `.npz` (official ViT/big_vision; `FILE.npz:SUBTREE` reads one tower of a
  multi-model checkpoint, e.g. `:img` for SigLIP), `.safetensors`,
  `.pth`/`.pt`/`.bin` (PyTorch state_dicts, read with `weights_only=True`)
  and TF checkpoints (a path prefix with an `.index` file, or its directory).
  Names and URIs are downloaded into the cache first (`weights/hub.py`).
  bfloat16 arrays (raw 2-byte types in an .npz) are read as bfloat16.  No
  pickles are ever executed.
  """
  return _read(hub.resolve(source))


def _read(resolved: "hub.Resolved") -> Flat:
  if resolved.mapping is not None:
    source = resolved.mapping
    flat = flatten(source) if any(isinstance(v, Mapping) for v in source.values()) else dict(source)
    return {k: _to_numpy(v) for k, v in flat.items()}
  flat = _read_path(os.fspath(resolved.path))
  return select_subtree(flat, resolved.subtree) if resolved.subtree else flat


def select_subtree(flat: Flat, subtree: str) -> Flat:
  """The part `subtree` ('img') of a multi-model checkpoint, as big_vision's `FILE.npz:img`."""
  for prefix in (f"params/{subtree}/", f"opt/target/{subtree}/", f"{subtree}/"):
    picked = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if picked:
      return picked
  tops = sorted({k.split("/")[1] if k.startswith("params/") and "/" in k[7:] else k.split("/")[0] for k in flat})
  raise CheckpointMismatchError(f"the checkpoint has no part {subtree!r}; its top-level parts are {tops[:12]}.")


def _read_path(path: str) -> Flat:
  # Every format behind integrity.read_checked: a broken or hostile file is one clear error naming it.
  if os.path.exists(path + ".index") or (os.path.isdir(path) and _tf_checkpoint_prefix(path)):
    prefix = _tf_checkpoint_prefix(path) if os.path.isdir(path) else path
    return integrity.read_checked(prefix, "tf", _read_tf_checkpoint)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  lower = path.lower()
  if lower.endswith(".npz"):
    def read_npz(p):
      with np.load(p, allow_pickle=False) as data:
        return {k: _npz_array(data[k]) for k in data.files}
    return integrity.read_checked(path, "npz", read_npz)
  if lower.endswith(".safetensors"):
    return integrity.read_checked(path, "safetensors", _read_safetensors)
  if lower.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs PyTorch (pip install torch); "
                        "a .safetensors file needs only the safetensors package.") from e
    state = integrity.read_checked(path, "torch", lambda p: torch.load(p, map_location="cpu", weights_only=True))
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
      if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
        state = state[wrapper]
        break
    return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
  raise ValueError(f"cannot tell the format of {path!r}: expected .npz (official ViT), .safetensors, "
                   ".pth/.pt/.bin (timm/PyTorch state_dict) or a TF checkpoint prefix.")


def _npz_array(value: np.ndarray) -> np.ndarray:
  """numpy writes bfloat16 (ml_dtypes) arrays as a raw 2-byte type ('V2'): view them as bfloat16 again."""
  if value.dtype.kind == "V" and value.dtype.itemsize == 2 and value.dtype.names is None:
    import ml_dtypes
    return value.view(ml_dtypes.bfloat16)
  return value


def _read_safetensors(path: str) -> Flat:
  """safetensors' numpy reader, and our own for the dtypes numpy lacks (BF16, as ml_dtypes.bfloat16)."""
  with open(path, "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
    from safetensors.numpy import load_file
    return load_file(path)
  import ml_dtypes
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  data = np.memmap(path, dtype=np.uint8, mode="r")
  start = 8 + int.from_bytes(bytes(data[:8]), "little")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    out[name] = np.array(data[start + begin:start + end]).view(dtypes[info["dtype"]]).reshape(info["shape"])
  return out


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
    towers = sorted({k.split("/")[-3] for k in flat if k.endswith("/embedding/kernel") and k.count("/") >= 2})
    if towers:
      hint += (f" It holds several models ({', '.join(towers)}, e.g. a SigLIP/LiT two-tower checkpoint): read one "
               f"with 'FILE.npz:{towers[0]}' (big_vision's notation).")
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


def _model_for_entry(entry, model, image_size, overrides):
  """(model, image size, options) to build for a catalogue checkpoint: the entry's, under the caller's
  choices; a module of the caller is kept (with a warning when it differs from the release's options)."""
  if model is None or model == entry.model:
    overrides = {**dict(entry.options), **overrides}
    image_size = entry.image_size if image_size is None else image_size
    return entry.model, image_size, overrides
  if isinstance(model, nn.Module):
    # (A representation layer the model lacks is dropped with the head: the official fine-tuning policy.)
    differ = {k: v for k, v in entry.options if getattr(model, k, v) != v and k != "representation_size"}
    if differ:
      logging.warning("vit_jax: %s was released with %s, but the model given has %s; loading anyway.", entry.name,
                      differ, {k: getattr(model, k) for k in differ})
  return model, image_size, overrides


def load_model(source, *, model: str | nn.Module | None = None, num_classes: int | None = None, image_size=None,
               posemb_resize: str | None = None, patch_resize: str | None = "pi", report: list | None = None,
               **overrides) -> tuple[nn.Module, dict[str, Any]]:
  """`(module, variables)`: `load_pretrained`, plus the module it built (with the class count it chose).

  With a catalogue name (or one of its URLs) `model` may be left out: the entry's model, options and
  image size are used (`model=` the entry's model name plus keyword overrides changes some of them).
  """
  if model is None and not isinstance(source, Mapping):
    text = os.fspath(source)
    if catalog.lookup(text) is None and not (hub.is_uri(text) and catalog.for_url(hub.split_subtree(text)[0])):
      raise TypeError(f"load_pretrained({text!r}): pass model= (a name of vit_jax.list_models() or a module); "
                      "only catalogue names (vit_jax.list_pretrained()) and their URLs know their model.")
  resolved = hub.resolve(source)
  entry = resolved.entry
  default_classes = 1000
  if entry is not None:
    model, image_size, overrides = _model_for_entry(entry, model, image_size, overrides)
    default_classes = entry.num_classes if model == entry.model else 1000
  elif model is None:
    raise TypeError("load_pretrained(mapping): pass model= (a name of vit_jax.list_models() or a module).")
  flat = _read(resolved)
  if num_classes is None and not isinstance(model, nn.Module):
    num_classes_to_build = default_classes  # then the checkpoint's head decides (below)
  else:
    num_classes_to_build = num_classes       # a module keeps its own class count unless one is given
  module = _resolve_model(model, num_classes_to_build, image_size, overrides)
  converted, fmt = _convert(flat, module)
  if num_classes is None and not isinstance(model, nn.Module):
    classes = head_classes(converted, module)
    if classes and classes != module.num_classes:
      module = module.clone(num_classes=classes)
  family = registry.get_family(module)
  expected = abstract_variables(module)
  try:
    fitted = fit.fit_to_model(converted, module, expected, head=family.head,
                              posemb_resize=posemb_resize or family.posemb_resize,
                              patch_kernels=family.patch_kernels, patch_resize=patch_resize, report=report)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{e}\n  (format: {fmt})") from None
  return module, unflatten({k: jnp.asarray(v, dtype=expected[k].dtype) for k, v in fitted.items()})


def load_pretrained(source, *, model: str | nn.Module | None = None, num_classes: int | None = None,
                    image_size=None, posemb_resize: str | None = None, patch_resize: str | None = "pi",
                    report: list | None = None, **overrides) -> dict[str, Any]:
  """Variables for `model` from an official/big_vision `.npz`, a timm/IBM/Hugging Face state_dict or a TF checkpoint.

  `source`: a local path, a catalogue name (`vit_jax.list_pretrained()`; then `model` may be left
  out), `gs://...`, `https://...`, `hf-hub:ORG/REPO[@REV][/FILE]` (downloaded once into the cache,
  `$VIT_JAX_CACHE`), `FILE.npz:img` for one tower of a two-tower checkpoint, or a mapping of arrays.
  The format is detected from the keys.  A head of another size is replaced by
  a zero-initialised head of `num_classes`; position embeddings (and MaxViT's
  relative-bias tables) are resized when `image_size` differs from the
  checkpoint's (`posemb_resize`: 'bilinear' as the official ViT code, or
  'bicubic' as timm; default: the family's, bicubic for CrossViT).  With a
  model name and `num_classes=None` the head keeps the checkpoint's class
  count.  Returns `{'params': ..., ['batch_stats': ...]}` ready for
  `model.apply(variables, images, train=False)`.

  Another patch size (`patch_size=8` on a /16 checkpoint: the model is built with it) resamples the
  patch-embedding kernel with FlexiViT's pseudo-inverse resize (`patch_resize="pi"`, big_vision
  `resample_patchemb`; None: fail instead).  `report` (a list) receives one line per adaptation made.
  """
  return load_model(source, model=model, num_classes=num_classes, image_size=image_size,
                    posemb_resize=posemb_resize, patch_resize=patch_resize, report=report, **overrides)[1]


def _export_state(variables: Mapping[str, Any], model, fmt: str, overrides) -> tuple[Flat, nn.Module]:
  """(state_dict of the outside format `fmt`, the module it describes) for our variables."""
  flat = flatten(nn.meta.unbox(dict(variables)))
  if isinstance(model, nn.Module):
    module = _resolve_model(model, None, None, overrides)
  else:
    module = _resolve_model(model, 1000, None, overrides)
    classes = head_classes(flat, module)
    module = module.clone(num_classes=0 if classes is None else classes)  # no head: a features model (ViT)
  family = registry.get_family(module)
  exporters = [c for c in converters(family.name) if c.fmt == fmt and c.from_variables]
  if not exporters:
    raise NotImplementedError(f"no {fmt} exporter for the {family.name} family.")
  if getattr(module, "scan", False):  # timm / transformers have one module per layer
    module = module.clone(scan=False)
    flat = fit.match_layout(flat, abstract_variables(module))
  state = exporters[0].from_variables(flat, module)
  state = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32) if np.asarray(v).dtype != np.int64
                                   else np.asarray(v)) for k, v in state.items()}
  return state, module


def export_timm(variables: Mapping[str, Any], *, model: str | nn.Module, path: str | None = None,
                **overrides) -> Flat:
  """A timm state_dict (numpy) for `variables`; also written to `path` (.safetensors) when given."""
  state, _ = _export_state(variables, model, "timm", overrides)
  if path is not None:
    from safetensors.numpy import save_file
    save_file(state, path)
  return state


def export_transformers(variables: Mapping[str, Any], *, model: str | nn.Module, path: str | None = None,
                        **overrides) -> Flat:
  """A Hugging Face transformers ViT state_dict (numpy) for `variables` (ViTForImageClassification, or
  ViTModel for a model without head); with `path`, the directory `from_pretrained(path)` loads
  (`model.safetensors` + `config.json`)."""
  state, module = _export_state(variables, model, "transformers", overrides)
  if path is not None:
    from vit_jax.weights.transformers import vit as hf_vit
    hf_vit.save(state, module, os.fspath(path))
  return state
