"""Learning-rate schedules and optimisers of the reference recipes (all optax).

  sgd    official ViT fine-tuning: SGD, momentum 0.9, global-norm clip 1.0, no weight decay
  adam   ViT pre-training (paper, ImageNet-21k): Adam b1=0.9 b2=0.999 and decoupled weight decay
  adamw  AugReg / CrossViT / MaxViT: AdamW (weight decay multiplied by the learning rate, as optax/PyTorch)

Weight decay applies to kernels only (not biases, norms, position embeddings or
the class token), as big_vision's default mask `.*/kernel$` and timm's
no_weight_decay lists.  Optimiser state stays float32 (mixed precision only
changes the compute dtype of the model).
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from vit_jax.train import config_base

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY_TYPES = ("cosine", "linear", "constant")


def learning_rate_schedule(*, base_lr: float, total_steps: int, warmup_steps: int = 0,
                           decay_type: str = "cosine", linear_end: float = 1e-5,
                           min_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then cosine to `min_lr`, linear to `linear_end`, or constant.

  Matches the official `create_learning_rate_schedule` (lr 0 at step 0, base_lr at `warmup_steps`).
  """
  if decay_type not in DECAY_TYPES:
    raise ValueError(f"unknown decay_type {decay_type!r}; choose one of {DECAY_TYPES}.")
  if not 0 <= warmup_steps < max(total_steps, 1):
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}).")
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay_type == "cosine":
    decay = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=min_lr / base_lr if base_lr else 0.0)
  elif decay_type == "linear":
    decay = optax.linear_schedule(base_lr, linear_end, decay_steps)
  else:
    decay = optax.constant_schedule(base_lr)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _decay_mask(params: Any) -> Any:
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config, total_steps: int | None = None,
                   warmup_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, learning-rate schedule) from the training config.

  `total_steps`, `warmup_steps`: the run's durations in steps when already resolved
  (`config_base.training_steps`); by default config.total_steps and config.warmup_steps.
  """
  if total_steps is None or warmup_steps is None:
    total, warmup = config_base.training_steps(config)
    total_steps = total if total_steps is None else total_steps
    warmup_steps = warmup if warmup_steps is None else warmup_steps
  lr = learning_rate_schedule(base_lr=config.lr, total_steps=total_steps, warmup_steps=warmup_steps,
                              decay_type=config.decay_type, linear_end=config.linear_end, min_lr=config.min_lr)
  name = config.optimizer
  wd = float(config.weight_decay or 0.0)
  if name == "sgd":
    parts = [optax.add_decayed_weights(wd, mask=_decay_mask)] if wd else []
    parts.append(optax.sgd(lr, momentum=config.momentum or None, nesterov=bool(config.nesterov)))
    tx = optax.chain(*parts)
  elif name in ("adam", "adamw"):
    tx = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=wd, mask=_decay_mask)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, lr
