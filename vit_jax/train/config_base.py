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

from vit_jax import fewshot

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

  # A checkpoint file, catalogue name (vit_jax.list_pretrained()) or URI that initialises a NEW run (a workdir
  # with checkpoints always resumes them instead); "" or "scratch": random initialisation; None (a fine-tuning
  # recipe's default): must be given, so that a forgotten checkpoint never trains from scratch in silence.
  c.pretrained = _typed(str, "")
  c.seed = 0
  c.batch_size = 512  # global, over all devices and processes
  c.eval_batch_size = 512
  # Gradient accumulation: an int >= 1, or "auto": before training, compile the train step for candidate
  # micro-batches and take the largest that fits the device memory (memory_stats, else memory_budget_gb).
  c.accum_steps = ml_collections.FieldReference(1, field_type=object)
  c.memory_budget_gb = 0.0  # per-device memory for accum_steps="auto"; 0: the device's own limit
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
  # Layer-wise learning-rate decay (BEiT / timm param_groups_layer_decay): the head at the full rate, block i
  # of `depth` at layer_decay ** (depth - i), the embeddings lowest; the depth order is the model family's
  # (registry.Family.layer_id).  0 or 1: off; e.g. 0.65-0.75.
  c.layer_decay = 0.0
  # Regular expression (re.fullmatch) of the parameter paths that are not trained, e.g.
  # "Transformer/encoderblock_[0-5]/.*"; they get no optimiser state.  "": train everything.
  c.frozen = ""
  # EMA of the parameters (and BatchNorm statistics), evaluated alongside the raw ones: timm's ModelEmaV3.
  # 0: off.  With ema_warmup the decay at update t is min(ema_decay, 1 - (1 + t / gamma) ** -power).
  c.ema_decay = 0.0
  c.ema_warmup = True
  c.ema_warmup_gamma = 1.0
  c.ema_warmup_power = 2 / 3
  c.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "switch_prob": 0.5})

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.checkpoint_every = 1000  # steps; 0: only at the end
  c.keep_checkpoints = 3
  # When checkpoints exist but none can be restored, start from step 0 (moving them aside) instead of
  # stopping (vit_jax.train.checkpoint); a restorable checkpoint is still resumed.
  c.restart_from_scratch = False
  # Undecodable examples are skipped up to this fraction of an epoch (or evaluation pass), then the run stops.
  c.max_bad_fraction = 0.01
  c.eval_every = 1000  # steps; 0: only at the end
  # Few-shot linear evaluation of the frozen pre-logit features (vit_jax.fewshot, as big_vision's
  # fewshot_lsr evaluator), logged as fewshot_{k}shot; a data set name turns it on.
  c.fewshot = ml_collections.ConfigDict(dict(dataset="", train_split="train", test_split="test",
                                             shots=fewshot.SHOTS, seeds=3, l2_reg=fewshot.L2_REG))
  c.fewshot_every = 0  # steps; 0: only at the end
  c.log_every = 10
  c.progress_secs = 5.0
  # A directory for JAX's persistent compilation cache: a restarted (resumed, preempted) run on the same
  # topology loads its compiled steps instead of compiling them again; "": no cache (JAX's default, or
  # the JAX_COMPILATION_CACHE_DIR environment variable). Local disk, or a bucket path on pods (gs://...).
  c.compilation_cache_dir = ""
  # The train step's dropout/drop-path generator (step.dropout_key): threefry (JAX's default), rbg or
  # unsafe_rbg; each keeps a run reproducible and resumable, the masks differ between them.
  c.dropout_rng_impl = "threefry"
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


# ----------------------------------------------------------------------------- initialisation, accumulation

SCRATCH = ("", "scratch")  # values of config.pretrained that mean a random initialisation


def pretrained_source(config) -> str | None:
  """The checkpoint that initialises a new run (config.pretrained), or None for random weights.

  Raises when the recipe leaves `pretrained` to be given (None) and it was not.
  """
  value = config.get("pretrained")
  if value is None:
    raise ValueError(
        "config.pretrained is not set, and this recipe fine-tunes a pretrained checkpoint: pass "
        "--config.pretrained=NAME_OR_PATH (e.g. vit_models/imagenet21k/ViT-B_16 or an AugReg file; "
        "vit_jax.list_pretrained(model=...) lists them), or --config.pretrained=scratch to train from random weights.")
  return None if value.strip().lower() in SCRATCH else value


def accum_steps_option(config) -> int | str:
  """config.accum_steps checked: an int >= 1 or "auto"."""
  value = config.accum_steps
  if isinstance(value, str) and value.strip().lower() == "auto":
    return "auto"
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"accum_steps must be an integer >= 1 or 'auto', got {value!r}.")
  return value


def ema_options(config) -> dict | None:
  """`step.make_train_step(ema=...)` of the config: the EMA decay options, None without EMA (ema_decay 0)."""
  decay = float(config.get("ema_decay") or 0.0)
  if not decay:
    return None
  if not 0.0 < decay < 1.0:
    raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9999), or 0 for no EMA; got {decay}.")
  return dict(decay=decay, warmup=bool(config.ema_warmup), gamma=float(config.ema_warmup_gamma),
              power=float(config.ema_warmup_power))


# ----------------------------------------------------------------------------- compilation cache

def enable_compilation_cache(config) -> str | None:
  """Points JAX's persistent compilation cache at config.compilation_cache_dir (if set), caching every
  program (also the small and quick ones: a start-up compiles a dozen); returns the directory or None.
  Call before the run compiles anything."""
  directory = config.compilation_cache_dir
  if not directory:
    return None
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir != directory:
    compilation_cache.reset_cache()  # a cache this process already opened elsewhere is closed first
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


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
