"""The training config: its keys and defaults (`base_config`), and what is derived from it.

Config files in `configs/` start from `base_config()` and change what their
recipe needs; every other module reads keys by attribute, so a default lives
here and nowhere else.  The config is locked when loaded, so a misspelt
`--config.KEY=VALUE` fails with the list of existing keys.

Keys other tools rely on: model.name, dataset, batch_size (global),
total_steps, seed, checkpoint_every, eval_every, pretrained, image_size,
accum_steps, mesh.data, mesh.fsdp, mesh.tensor (-1 = the remaining devices).

Durations: the length of the run and of the warm-up are given in exactly one of
three forms each, `{total,warmup}_steps`, `_epochs` or `_examples` (the others
None); epochs and examples are turned into steps at start from the size of the
training split (`steps`, as big_vision's `utils.steps`).

This module sits below `trainer` and `checkpoint` (and `vit_jax.predict.restore`):
it imports neither.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

DTYPE_FIELDS = ("dtype", "param_dtype")
DURATION_FORMS = ("steps", "epochs", "examples")


def parse_args(arg: str | None, **defaults):
  """`"key=value,key2=value2"` (or a bare first value) -> ConfigDict with the types of `defaults`."""
  args = ml_collections.ConfigDict(defaults)
  if not arg:
    return args
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    if "=" in item:
      key, value = item.split("=", 1)
    elif i == 0 and keys:
      key, value = keys[0], item
    else:
      raise ValueError(f"config argument {item!r}: use key=value; valid keys: {keys}.")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid keys: {keys}.")
    kind = type(defaults[key])
    if kind is bool:
      args[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      args[key] = value
    else:
      args[key] = kind(value)
  return args


def _typed(kind: type, value=None):
  """A field of type `kind` that may also be None (ml_collections' placeholder), set to `value`."""
  field = placeholder(kind)
  field.set(value)
  return field


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"name": "ViT-B_16"})
  c.dataset = "cifar10"
  c.train_split = "train"
  c.eval_split = "test"
  c.data_dir = ""
  c.num_classes = -1  # -1: from the data set
  c.image_size = 384
  c.input = ml_collections.ConfigDict()  # extra options for vit_jax.data.get_dataset (training)
  c.input_eval = ml_collections.ConfigDict()  # ... and for evaluation

  c.pretrained = ""  # path of an official .npz / timm file; "" = from scratch
  c.seed = 0
  c.batch_size = 512  # global, over all devices and processes
  c.eval_batch_size = 512
  c.accum_steps = 1
  # Durations: exactly one form each (the others None); epochs/examples count the train split.
  c.total_steps = _typed(int, 10_000)
  c.total_epochs = _typed(float)
  c.total_examples = _typed(int)
  c.warmup_steps = _typed(int, 500)
  c.warmup_epochs = _typed(float)
  c.warmup_examples = _typed(int)

  c.optimizer = "sgd"
  c.lr = 0.03
  c.momentum = 0.9  # sgd
  c.nesterov = False  # sgd
  c.b1, c.b2 = 0.9, 0.999  # adam, adamw
  c.eps = 1e-8  # adam, adamw
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0  # 0: no clipping
  c.decay_type = "cosine"
  c.linear_end = 1e-5  # end of linear decay
  c.min_lr = 0.0  # end of cosine decay
  c.label_smoothing = 0.0
  c.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "switch_prob": 0.5})

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.checkpoint_every = 1000  # steps; 0: only at the end
  c.keep_checkpoints = 3
  c.eval_every = 1000  # steps; 0: only at the end
  c.log_every = 10
  c.progress_secs = 5.0
  c.num_predictions = 0  # print this many test predictions from the restored checkpoint at the end
  return c


# ----------------------------------------------------------------------------- durations

def steps(prefix: str, config, data_size: int | None = None, batch_size: int | None = None) -> int:
  """`{prefix}_steps`, or `{prefix}_epochs` / `{prefix}_examples` converted to steps (big_vision's utils.steps).

  Exactly one of the three keys may be set (not None).  Epochs need the number
  of training examples `data_size`; examples and epochs round down to whole
  steps of `batch_size` (default config.batch_size).
  """
  batch_size = batch_size or config.batch_size
  given = {form: config.get(f"{prefix}_{form}") for form in DURATION_FORMS}
  given = {form: value for form, value in given.items() if value is not None}
  keys = [f"{prefix}_{form}" for form in DURATION_FORMS]
  if len(given) != 1:
    what = ", ".join(f"{prefix}_{form}={value}" for form, value in given.items()) or "none of them"
    raise ValueError(f"give exactly one of {', '.join(keys)} (the others None); got {what}.")
  (form, value), = given.items()
  if value < 0:
    raise ValueError(f"{prefix}_{form} must be >= 0, got {value}.")
  if form == "steps":
    return int(value)
  if form == "epochs":
    if data_size is None:
      raise ValueError(f"{prefix}_epochs={value} needs the size of the training split, which is unknown here; "
                       f"give {prefix}_steps instead.")
    value = value * data_size
  return int(value // batch_size)


def training_steps(config, train_examples: int | None = None) -> tuple[int, int]:
  """(total_steps, warmup_steps) of `config`, with `train_examples` for durations in epochs."""
  total = steps("total", config, train_examples)
  warmup = steps("warmup", config, train_examples)
  if total < 1:
    raise ValueError(f"the run must last at least one step; total_steps resolves to {total}.")
  return total, warmup


# ----------------------------------------------------------------------------- the model

def model_overrides(config) -> dict[str, Any]:
  """config.model minus `name`, with dtype names turned into dtypes and lists into tuples."""
  import jax.numpy as jnp
  overrides = {}
  for key, value in config.model.items():
    if key == "name":
      continue
    if key in DTYPE_FIELDS and isinstance(value, str):
      value = jnp.dtype(value)
    elif isinstance(value, list):
      value = tuple(value)
    overrides[key] = value
  return overrides


def check_model(config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Raises for an unknown model name (listing close ones) or model option; returns the overrides."""
  from vit_jax.models import registry
  name = config.model.name
  names = registry.list_models()
  if name not in names:
    raise registry.unknown_name_error("model", name, names)
  overrides = model_overrides(config) if overrides is None else overrides
  registry.check_overrides(name, overrides)
  return overrides


def build_model(config, num_classes: int | None = None, overrides: dict[str, Any] | None = None):
  """The model of `config` (config.model.name + overrides, config.image_size, num_classes).

  `overrides`: `model_overrides(config)` when already computed.
  """
  from vit_jax.models import registry
  num_classes = num_classes or config.num_classes
  if not num_classes or num_classes < 1:
    raise ValueError("config.num_classes is not set; it is filled from the data set at start.")
  overrides = model_overrides(config) if overrides is None else overrides
  return registry.get_model(config.model.name, num_classes=num_classes, image_size=config.image_size,
                            **overrides)
