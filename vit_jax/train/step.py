"""The jitted train and eval steps (explicit in/out shardings, donated state).

Gradient accumulation splits the global batch into `accum_steps` micro-batches
and sums their gradients in a `lax.scan`; the micro-batches interleave examples
(`i, i + accum, ...`) so that each stays split over the data-parallel devices
without moving data.  The mean of equal-sized micro-batch means equals the
full-batch mean, so accum_steps=k and one big step give the same update.

BatchNorm (MaxViT) under accumulation: each micro-batch is normalised with its
own statistics (as on k devices without cross-device BatchNorm), and every
micro-batch updates the running statistics from the same starting point; the
new running statistics are the mean over micro-batches of those updates:
    stats' = mean_i (m * stats + (1 - m) * batch_stat_i) = m * stats + (1 - m) * mean_i batch_stat_i,
so one step moves them once, by the mean of the micro-batch means (= the full
batch's mean) and of the micro-batch variances, whatever accum_steps is.

With an EMA in the state (`ema=`), it is updated after the optimiser step from
the new parameters and statistics (`state.update_ema`, timm's ModelEmaV3).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax.data import mixup as mixup_lib
from vit_jax.models import layers
from vit_jax.train import sharding as shd
from vit_jax.train import state as state_lib
from vit_jax.train.state import TrainState


def _global_norm(tree) -> jax.Array:
  # optax.tree.norm replaces the deprecated optax.global_norm (optax >= 0.2.5).
  tree_lib = getattr(optax, "tree", None)
  return tree_lib.norm(tree) if tree_lib is not None and hasattr(tree_lib, "norm") else optax.global_norm(tree)


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  return onehot


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy, in float32 whatever the compute dtype."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


DROPOUT_RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def check_dropout_rng_impl(impl: str) -> None:
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(f"dropout_rng_impl must be one of {DROPOUT_RNG_IMPLS}, got {impl!r}.")


def dropout_key(key: jax.Array, impl: str) -> jax.Array:
  """The dropout/drop-path key of a step, derived from the step's (threefry) key `key`.

  threefry (JAX's default) computes every random bit with the threefry hash: on CPU and GPU that costs a
  good part of a step with dropout. `rbg` / `unsafe_rbg` keys (as big_vision and MaxText train with) draw
  the bits with XLA's RngBitGenerator (Philox-like, fast everywhere, the native generator on TPU); the key
  is made from the step's key, so a run stays a pure function of (seed, step): reproducible, and a resumed
  run draws the same masks. `unsafe_rbg` also splits and folds with the generator (cheaper, fewer
  guarantees on the independence of split keys). The masks differ between implementations (not the model).
  """
  check_dropout_rng_impl(impl)
  if impl == "threefry":
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def _batch_split(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`fn` traced with the models' activations kept split over the batch (`layers.constrain_batch`)."""
  def traced(*args):
    with layers.shard_activations(lambda rank: shd.batch_sharding(mesh, rank), shd.data_parallel_size(mesh)):
      return fn(*args)
  return traced


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, state_shardings: TrainState, *, accum_steps: int = 1,
                    label_smoothing: float = 0.0, mixup: dict | None = None,
                    ema: dict | None = None, dropout_rng_impl: str = "threefry") -> Callable:
  """`step(state, batch) -> (state, metrics)`, jitted with shardings; `state` is donated.

  `batch` = {"image": f32 [B, h, w, 3], "label": int32 [B]} split over (data, fsdp).
  `mixup` = {"mixup_alpha", "cutmix_alpha", "switch_prob"} or None.
  `ema` = keyword arguments of `state.ema_decay` ({"decay", "warmup", "gamma", "power"}) when the state
  keeps an EMA (state_shardings(..., ema=True)), else None.
  metrics: loss, grad_norm, param_norm, learning_rate (replicated scalars), and ema_decay with an EMA.
  `dropout_rng_impl`: the generator of the dropout/drop-path masks (`dropout_key`).
  """
  check_dropout_rng_impl(dropout_rng_impl)  # a bad name fails here, not when tracing
  if bool(ema) != state_lib.has_ema(state_shardings):
    raise ValueError("make_train_step: pass ema= exactly when the state keeps an EMA (state_shardings(ema=True)).")
  num_classes = model.num_classes
  has_bn = bool(jax.tree.leaves(state_shardings.batch_stats))

  def loss_fn(params, batch_stats, images, targets, rng):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = batch_stats
      logits, updates = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                    mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      logits = model.apply(variables, images, train=True, rngs={"dropout": rng})
    return cross_entropy(logits, targets), batch_stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    mix_rng, dropout_rng = jax.random.split(rng)
    dropout_rng = dropout_key(dropout_rng, dropout_rng_impl)
    images = batch["image"]
    targets = soft_targets(batch["label"], num_classes, label_smoothing)
    if mixup:
      images, targets = mixup_lib.mix(mix_rng, images, targets, **mixup)

    if accum_steps == 1:
      (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, targets, dropout_rng)
    else:
      def split(x):
        # [B, ...] -> [accum, B / accum, ...], micro-batch i = rows i, i + accum, ...
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        x = jnp.moveaxis(x, 1, 0)
        spec = P(None, shd.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

      def micro(carry, xs):
        grads_sum, loss_sum, stats_sum, i = carry
        # Every micro-batch starts from the step's running statistics (see the module docstring).
        (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, xs[0], xs[1],
                                             jax.random.fold_in(dropout_rng, i))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        stats_sum = jax.tree.map(jnp.add, stats_sum, batch_stats)
        return (grads_sum, loss_sum + loss, stats_sum, i + 1), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, batch_stats, _), _ = jax.lax.scan(
          micro, (zeros, jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.batch_stats),
                  jnp.zeros((), jnp.int32)),
          (split(images), split(targets)))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      batch_stats = jax.tree.map(lambda s: s / accum_steps, batch_stats)
      loss = loss / accum_steps

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "grad_norm": _global_norm(grads),
               "param_norm": _global_norm(params), "learning_rate": lr_schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
    if ema:
      decay = state_lib.ema_decay(state.step + 1, **ema)
      new_state = new_state.replace(ema=state_lib.update_ema(state.ema, params, batch_stats, decay))
      metrics["ema_decay"] = decay
    return new_state, metrics

  return jax.jit(_batch_split(step, mesh), in_shardings=(state_shardings, shd.batch_shardings(mesh, shd.TRAIN_KEYS)),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: jax.sharding.Mesh, state_shardings: TrainState) -> Callable:
  """`eval_step(state, batch) -> {"correct", "correct_top5", "count", "loss_sum"}` summed over the batch.

  Padded examples (mask False) count nowhere, so the sums over a padded
  evaluation pass cover every example exactly once.
  """
  has_bn = bool(jax.tree.leaves(state_shardings.batch_stats))

  def eval_step(state: TrainState, batch: dict) -> dict:
    variables = {"params": state.params}
    if has_bn:
      variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    k = min(5, logits.shape[-1])
    topk = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"correct": jnp.sum(top1 * mask), "correct_top5": jnp.sum(topk * mask),
            "count": jnp.sum(mask), "loss_sum": jnp.sum(loss * mask)}

  return jax.jit(_batch_split(eval_step, mesh), in_shardings=(state_shardings, shd.batch_shardings(mesh, shd.EVAL_KEYS)),
                 out_shardings=shd.replicated(mesh))
