"""Learning-rate schedules and optimisers of the reference recipes (all optax).

  sgd    official ViT fine-tuning: SGD, momentum 0.9, global-norm clip 1.0, no weight decay
  adam   ViT pre-training (paper, ImageNet-21k): Adam b1=0.9 b2=0.999 and decoupled weight decay
  adamw  AugReg / CrossViT / MaxViT: AdamW (weight decay multiplied by the learning rate, as optax/PyTorch)
  adafactor  Scaling ViTs (Zhai et al. 2106.04560; big_vision `scale_by_adafactor`, the ViT-g/G recipe):
         factored second moments (a row and a column statistic per matrix, `optax.scale_by_factored_rms`,
         decay 1 - t^-0.8 capped at b2), momentum b1 kept in bfloat16, decoupled weight decay as adamw.
         About 2 bytes of optimiser state per parameter instead of adam's 8 (`state_bytes_per_param`).

Weight decay applies to kernels only (not biases, norms, position embeddings or
the class token), as big_vision's default mask `.*/kernel$` and timm's
no_weight_decay lists.  Optimiser state stays float32 (mixed precision only
changes the compute dtype of the model).

On top of any of them (they need the model, `make_optimizer(..., model=)`):

  layer_decay  layer-wise learning-rate decay (BEiT, timm `param_groups_layer_decay`): every update is
               scaled by layer_decay ** (num_layers - 1 - layer_id), the depth order being the model
               family's (`registry.Family.layer_id`): the head at the full rate, the embeddings lowest.
               Scaling the update equals a per-group learning rate for SGD-momentum and AdamW alike
               (updates are linear in the rate; AdamW's decoupled decay scales with it, as in PyTorch).
  frozen       a regex (re.fullmatch on 'a/b/kernel' paths): those parameters get `optax.set_to_zero()`
               through `optax.multi_transform`, so no optimiser state at all; the trained ones get the
               optimiser above, whose gradient clipping then sees only them (as big_vision's frozen mask).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.train import config_base

OPTIMIZERS = ("sgd", "adam", "adamw", "adafactor")
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


def scale_by_adafactor(*, b1: float = 0.9, b2_cap: float = 0.999, min_dim_size_to_factor: int = 32,
                       decay_rate: float = 0.8, eps: float = 1e-30) -> optax.GradientTransformation:
  """big_vision's `scale_by_adafactor` (big_vision/optax.py) in optax parts: factored RMS scaling with the
  decay min(b2_cap, 1 - (t + 1) ** -decay_rate), then a bfloat16 momentum b1 (no debiasing)."""
  def decay(step, exponent):
    t = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.minimum(b2_cap, 1.0 - t ** (-exponent))
  parts = [optax.scale_by_factored_rms(factored=True, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                                       epsilon=eps, decay_rate_fn=decay)]
  if b1:
    parts.append(optax.ema(b1, debias=False, accumulator_dtype=jnp.bfloat16))
  return optax.chain(*parts)


def state_bytes_per_param(tx: optax.GradientTransformation, params: Any) -> float:
  """Bytes of optimiser state per parameter that `tx` keeps for `params` (arrays or ShapeDtypeStructs)."""
  state = jax.eval_shape(tx.init, params)
  size = lambda tree: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return size(state) / count


def _decay_mask(params: Any) -> Any:
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def param_path(path) -> str:
  """'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' of a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def layer_scales(params: Any, model, layer_decay: float) -> Any:
  """Per leaf of `params`, its layer-wise lr factor: layer_decay ** (num_layers - 1 - layer_id) (a float, or for
  a scanned stack an array broadcasting over its leading layer axis)."""
  from vit_jax.models import registry
  family = registry.get_family(model)
  if family.layer_id is None or family.num_layers is None:
    raise ValueError(f"layer_decay: the {family.name} family defines no depth order (registry.Family.layer_id).")
  top = family.num_layers(model) - 1

  def scale(path, leaf):
    ids = family.layer_id(param_path(path), model)
    if isinstance(ids, tuple):
      factors = np.asarray([layer_decay ** (top - i) for i in ids], np.float32)
      return factors.reshape((-1,) + (1,) * (len(np.shape(leaf)) - 1))
    return float(layer_decay ** (top - ids))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(model, layer_decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_scales` factor (stateless)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, model, layer_decay)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(init, update)


def frozen_labels(params: Any, pattern: str) -> Any:
  """'frozen' / 'trained' per leaf: does its path fully match `pattern`?  Raises when it matches none or all."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"frozen={pattern!r} is not a regular expression: {e}.") from None
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if regex.fullmatch(param_path(path)) else "trained", params)
  kinds = jax.tree.leaves(labels)
  if "frozen" not in kinds or "trained" not in kinds:
    example = param_path(jax.tree_util.tree_leaves_with_path(params)[0][0])
    what = "no parameter" if "frozen" not in kinds else "every parameter"
    raise ValueError(f"frozen={pattern!r} matches {what} (re.fullmatch on paths like {example!r}); "
                     "e.g. 'Transformer/encoderblock_[0-5]/.*' freezes the first six ViT blocks.")
  return labels


def make_optimizer(config, total_steps: int | None = None, warmup_steps: int | None = None, *,
                   model=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, learning-rate schedule) from the training config.

  `total_steps`, `warmup_steps`: the run's durations in steps when already resolved
  (`config_base.training_steps`); by default config.total_steps and config.warmup_steps.
  `model`: the module trained (needed for config.layer_decay and config.frozen).
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
  elif name == "adafactor":
    tx = optax.chain(scale_by_adafactor(b1=config.b1, b2_cap=config.b2),
                     optax.add_decayed_weights(wd, mask=_decay_mask), optax.scale_by_learning_rate(lr))
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  layer_decay, frozen = float(config.get("layer_decay") or 0.0), config.get("frozen") or ""
  if (layer_decay and layer_decay != 1.0 or frozen) and model is None:
    raise ValueError("layer_decay / frozen need the model: make_optimizer(config, ..., model=model).")
  if layer_decay and layer_decay != 1.0:
    if not 0.0 < layer_decay < 1.0:
      raise ValueError(f"layer_decay must be in (0, 1) (e.g. 0.75), or 0 for none; got {layer_decay}.")
    tx = optax.chain(tx, scale_by_layer(model, layer_decay))
  if frozen:
    import flax.linen as nn
    from vit_jax.models import registry
    abstract = nn.meta.unbox(registry.abstract_variables(model)["params"])
    frozen_labels(abstract, frozen)  # fails here (not at the first step) when it matches none or all
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, frozen))
  return tx, lr
