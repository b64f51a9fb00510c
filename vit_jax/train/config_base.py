"""The keys every training config has, with the official fine-tuning defaults.

Config files in `configs/` start from `base_config()` and change what their
recipe needs.  The config is locked when loaded, so a misspelt
`--config.KEY=VALUE` fails with the list of existing keys.

Keys other tools rely on: model.name, dataset, batch_size (global),
total_steps, seed, checkpoint_every, eval_every, pretrained, image_size,
accum_steps, mesh.data, mesh.fsdp, mesh.tensor (-1 = the remaining devices).
"""
from __future__ import annotations

import ml_collections


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
  c.total_steps = 10_000

  c.optimizer = "sgd"
  c.lr = 0.03
  c.momentum = 0.9
  c.b1, c.b2 = 0.9, 0.999
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.warmup_steps = 500
  c.decay_type = "cosine"
  c.linear_end = 1e-5  # end of linear decay
  c.min_lr = 0.0  # end of cosine decay
  c.label_smoothing = 0.0
  c.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "switch_prob": 0.5})

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 1000
  c.log_every = 10
  c.progress_secs = 5.0
  c.num_predictions = 0  # print this many test predictions from the restored checkpoint at the end
  return c
