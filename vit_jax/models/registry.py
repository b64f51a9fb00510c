"""Model families and their variants: one record per family, registered by its model file.

A family record (`Family`) holds everything the rest of the package needs to
know about a family, so that nothing else branches on its name:

  module        the flax.linen Module class (one per family)
  variants      model name -> the module's field values (e.g. "ViT-B_16" -> hidden_size=768, ...)
  converters    modules under `vit_jax.weights` that register the family's checkpoint formats
                (imported on first use of `load_pretrained` / `export_timm`)
  timm_names    model name -> timm architecture at the native resolution (benchmarks, export)
  timm_kwargs   (module, names of overridden fields) -> keyword arguments of `timm.create_model` that
                build the same architecture and regularisation (the bench's `--vs timm`); raises
                ValueError for overrides timm cannot express
  head          top-level head modules, replaced by a zero head for a new class count
  posemb_resize the family's default position-embedding resize ('bilinear' as the official ViT
                code, 'bicubic' as timm / the official CrossViT code)
  layer_id      (parameter path 'a/b/kernel', module) -> its place in the depth order of layer-wise
                learning-rate decay (0 = the embeddings ... num_layers(module) - 1 = the head), as timm's
                `group_matcher`; a tuple (one id per layer) for a scanned stack's leading axis
  num_layers    module -> the number of places in that order
  patch_kernels parameter paths of the patch-embedding kernels [ph, pw, in, out] that the fit step may
                resample to another patch size (FlexiViT PI-resize)

`get_model` builds a module from a name plus keyword overrides; overrides are
checked against the module's dataclass fields so that a typo fails loudly.
Every family module validates its options at construction (`check_config`,
called from `__post_init__`), so a bad image size fails in `get_model`.

The released weights and their input settings live in one table, the catalogue
(`vit_jax.weights.catalog`); `pretrained_cfgs(name)` reads it.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import layers

# Every other module of vit_jax.models is a family file; they import lazily (they import this
# module) so that `import vit_jax` stays cheap.
_NOT_FAMILIES = ("layers", "registry")

# timm's IMAGENET_DEFAULT_* and IMAGENET_INCEPTION_* (the [-1, 1] range of the official ViT/MaxViT).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


ATTENTION_KINDS = ("self", "cross", "block", "grid")


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
  """Where the queries and keys of one attention layer sit in the input image (`vit_jax.analysis`).

  Each family's module answers `attention_layout(path)` for the module path of a layer (the module
  that holds a `layers.Attention`, e.g. "Transformer/encoderblock_3"), or None when its tokens are
  not one patch grid (then the layer is captured but has no geometry).
  """
  depth: int                         # the layer's place in the forward pass (0 = first attention)
  kind: str                          # "self": the tokens attend to each other; "cross": class-token or
                                     # probe queries onto a grid of keys; "block" / "grid": MaxViT's
                                     # windows of neighbours / of image-wide dilated positions
  grid: tuple[int, int]              # the keys' patch grid (one window for "block" / "grid")
  patch_size: tuple[float, float]    # input pixels between neighbouring keys (rows, columns)
  num_prefix_tokens: int = 0         # class tokens before the grid among the keys (and, "self", queries)
  branch: int = 0                    # CrossViT: the branch whose tokens are the keys
  feature_size: tuple[int, int] | None = None  # "block" / "grid": the feature map the windows tile

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {self.kind!r}.")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  module: type[nn.Module]
  variants: Mapping[str, Mapping[str, Any]]
  converters: tuple[str, ...] = ()
  timm_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  timm_kwargs: Callable[[nn.Module, set[str]], dict[str, Any]] | None = None
  head: tuple[str, ...] = ("head",)
  posemb_resize: str = "bilinear"
  layer_id: Callable[[str, nn.Module], int | tuple[int, ...]] | None = None
  num_layers: Callable[[nn.Module], int] | None = None
  patch_kernels: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}
_BY_MODEL: dict[str, Family] = {}
_BY_MODULE: dict[type, Family] = {}
_loaded = False


def register_family(family: Family) -> Family:
  """Called once by each family's model file at import."""
  if family.name in _FAMILIES:
    raise ValueError(f"Model family {family.name!r} is registered twice.")
  twice = sorted(set(family.variants) & set(_BY_MODEL))
  if twice:
    raise ValueError(f"Model name(s) {twice} are registered twice.")
  unknown = sorted(set(family.timm_names) - set(family.variants))
  if unknown:
    raise ValueError(f"{family.name}: timm names for unknown variants {unknown}.")
  _FAMILIES[family.name] = family
  _BY_MODULE[family.module] = family
  for name in family.variants:
    _BY_MODEL[name] = family
  return family


def _load_families() -> None:
  global _loaded
  if not _loaded:
    import pkgutil
    from vit_jax import models
    for info in pkgutil.iter_modules(models.__path__):
      if info.name not in _NOT_FAMILIES:
        importlib.import_module(f"vit_jax.models.{info.name}")
    _loaded = True


def families() -> list[Family]:
  _load_families()
  return list(_FAMILIES.values())


def list_models(family: str | None = None) -> list[str]:
  """Every registered model name (optionally of one family), sorted."""
  _load_families()
  if family is not None and family not in _FAMILIES:
    raise unknown_name_error("model family", family, sorted(_FAMILIES))
  return sorted(n for n, f in _BY_MODEL.items() if family is None or f.name == family)


def unknown_name_error(kind: str, name: str, valid: list[str]) -> ValueError:
  close = difflib.get_close_matches(name, valid, n=3, cutoff=0.4)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return ValueError(f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(valid)}.")


def get_family(model: str | nn.Module | type) -> Family:
  """The family of a model name, a module instance or a module class."""
  _load_families()
  if isinstance(model, str):
    if model in _BY_MODEL:
      return _BY_MODEL[model]
    if model in _FAMILIES:
      return _FAMILIES[model]
    raise unknown_name_error("model", model, list_models())
  cls = model if isinstance(model, type) else type(model)
  for klass in cls.__mro__:
    if klass in _BY_MODULE:
      return _BY_MODULE[klass]
  raise ValueError(f"{cls.__name__} is not the module of a registered model family "
                   f"({', '.join(f.module.__name__ for f in _FAMILIES.values())}).")


def model_family(name: str) -> str:
  """The family name ('vit', 'crossvit', 'maxvit') of a model name."""
  return get_family(name).name


def model_fields(module_cls: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name") and f.init]


def timm_name(name: str) -> str | None:
  """timm's architecture name for the model `name` at its native resolution (None: timm has none)."""
  return get_family(name).timm_names.get(name)


def regularisation_only(timm_rates: Mapping[str, str]) -> Callable[[nn.Module, set[str]], dict[str, Any]]:
  """A `timm_kwargs` for a family whose timm models take our rates (timm name -> our field) and no
  architecture options: the registered variants only."""
  def kwargs(model: nn.Module, overridden: set[str]) -> dict[str, Any]:
    architecture = sorted(set(overridden) - set(timm_rates.values()) - {"dtype", "param_dtype"})
    if architecture:
      raise ValueError(f"timm's {type(model).__name__} models take no architecture options; "
                       f"{architecture} cannot be matched there.")
    return {theirs: float(getattr(model, ours)) for theirs, ours in timm_rates.items() if getattr(model, ours)}
  return kwargs


def pretrained_cfgs(name: str):
  """The catalogue entries (`vit_jax.weights.catalog.Pretrained`: image size, crop, interpolation,
  mean/std, class count, timm name, ...) of every released weight of the model `name` (first: the default)."""
  get_family(name)  # an unknown name fails here
  from vit_jax.weights import catalog
  return catalog.for_model(name)


def __getattr__(name):
  if name == "PretrainedCfg":  # the catalogue entry is the per-release settings record
    from vit_jax.weights.catalog import Pretrained
    return Pretrained
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
  """TypeError naming every key of `overrides` that is not a field of the model's module."""
  valid = model_fields(get_family(name).module)
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise TypeError(f"Unknown option(s) {unknown} for model {name!r}. "
                    f"Valid options: {', '.join(sorted(valid))}.")


def get_model(name: str, *, num_classes: int = 1000, image_size: int | tuple[int, int] | None = None,
              **overrides: Any) -> nn.Module:
  """Builds the registered model `name`.

  `image_size=None` keeps the family's native size (224 for ViT/MaxViT, 240 for
  CrossViT).  Any other keyword overrides a field of the model's module; an
  unknown keyword raises with the list of valid ones.
  """
  family = get_family(name)
  if name not in family.variants:
    raise unknown_name_error("model", name, list_models())
  check_overrides(name, overrides)
  kwargs = dict(family.variants[name])
  kwargs.update(overrides)
  kwargs["num_classes"] = num_classes
  if image_size is not None:
    kwargs["image_size"] = image_size
  return family.module(**kwargs)


# ----------------------------------------------------------------------------- variables

def input_spec(model: nn.Module, batch: int = 1, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  """The NHWC image batch `model` takes at its `image_size`."""
  h, w = layers.to_2tuple(model.image_size)
  return jax.ShapeDtypeStruct((batch, h, w, 3), dtype)


def init_variables(model: nn.Module, rng: jax.Array) -> dict:
  """`model.init` on one zero image (params and, for MaxViT, batch_stats), boxed with logical axes."""
  spec = input_spec(model)
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "dropout": dropout_rng}, jnp.zeros(spec.shape, spec.dtype),
                    train=False)


def abstract_variables(model: nn.Module) -> dict:
  """The shapes of `model`'s variables, boxed with their logical axis names (no memory, no compute)."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


# ----------------------------------------------------------------------------- features

# Every family sows the input of its classifier head under this name in "intermediates".
FEATURES = "features"


def features(model: nn.Module, variables, images) -> jax.Array:
  """Pre-logit features [batch, width] of any family's model: what its head sees (eval mode).

  ViT/hybrid: the class token, the mean or the MAP-pooled tokens after the final norm (and the
  representation layer, if any); CrossViT: both branches' normed class tokens, concatenated;
  MaxViT: the pooled, normed tokens after the tanh pre-logits layer.
  """
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  return state["intermediates"][FEATURES][0].astype(jnp.float32)
