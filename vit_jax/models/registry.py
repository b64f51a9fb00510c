"""Name -> model factory registry shared by every family.

Each family file registers its variants with `register`; `get_model` builds a
`flax.linen.Module` from a name plus keyword overrides.  Overrides are checked
against the module's dataclass fields so that a typo fails loudly instead of
being ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import flax.linen as nn

# name -> (family, module class, default keyword arguments)
_REGISTRY: dict[str, tuple[str, type[nn.Module], dict[str, Any]]] = {}

# Families import lazily (they import this module) so that `import vit_jax` stays cheap.
_FAMILY_MODULES = ("vit_jax.models.vit", "vit_jax.models.crossvit", "vit_jax.models.maxvit")
_loaded = False


def register(name: str, family: str, module_cls: type[nn.Module], **defaults: Any) -> None:
  if name in _REGISTRY:
    raise ValueError(f"Model {name!r} is registered twice.")
  _REGISTRY[name] = (family, module_cls, defaults)


def import_modules(module_names) -> None:
  """Imports modules that register themselves here or in vit_jax.weights on import."""
  import importlib
  for module_name in module_names:
    importlib.import_module(module_name)


def _load_families() -> None:
  global _loaded
  if not _loaded:
    import_modules(_FAMILY_MODULES)
    _loaded = True


def list_models(family: str | None = None) -> list[str]:
  """Every registered model name (optionally of one family), sorted."""
  _load_families()
  return sorted(n for n, (f, _, _) in _REGISTRY.items() if family is None or f == family)


def unknown_name_error(kind: str, name: str, valid: list[str]) -> ValueError:
  close = difflib.get_close_matches(name, valid, n=3, cutoff=0.4)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return ValueError(f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(valid)}.")


def lookup(name: str) -> tuple[str, type[nn.Module], dict[str, Any]]:
  _load_families()
  if name not in _REGISTRY:
    raise unknown_name_error("model", name, list_models())
  return _REGISTRY[name]


def model_family(name: str) -> str:
  return lookup(name)[0]


def model_fields(module_cls: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(module_cls)
          if f.name not in ("parent", "name") and f.init]


def get_model(name: str, *, num_classes: int = 1000, image_size: int | tuple[int, int] | None = None,
              **overrides: Any) -> nn.Module:
  """Builds the registered model `name`.

  `image_size=None` keeps the family's native size (224 for ViT/MaxViT, 240 for
  CrossViT).  Any other keyword overrides a field of the model's module; an
  unknown keyword raises with the list of valid ones.
  """
  _, module_cls, defaults = lookup(name)
  valid = model_fields(module_cls)
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise TypeError(f"Unknown option(s) {unknown} for model {name!r}. "
                    f"Valid options: {', '.join(sorted(valid))}.")
  kwargs = dict(defaults)
  kwargs.update(overrides)
  kwargs["num_classes"] = num_classes
  if image_size is not None:
    kwargs["image_size"] = image_size
  kwargs.setdefault("model_name", name)
  return module_cls(**kwargs)
