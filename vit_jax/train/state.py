"""The train state and its creation directly in its sharded layout.

`TrainState` holds everything a resume needs from the devices: step, params,
optimiser state, BatchNorm statistics (MaxViT; empty otherwise), the base
RNG key (raw uint32 data so that Orbax stores it as a plain array) and, with
config.ema_decay, the EMA of the parameters and BatchNorm statistics
(`{"params", "batch_stats"}`; `{}` without EMA, also in checkpoints written
before the field existed: `checkpoint.Checkpointer.restore` reads those).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax.models import registry
from vit_jax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any
  rng: jax.Array  # uint32[2] raw key data; per-step keys are fold_in(rng, step)
  ema: Any = flax.struct.field(default_factory=dict)  # {"params", "batch_stats"} with EMA, else {}


def ema_decay(step, decay: float, warmup: bool = True, gamma: float = 1.0, power: float = 2 / 3):
  """The EMA decay at update `step` (1 = the first), timm's ModelEmaV3.get_decay (update_after_step 0,
  min_decay 0): 0 at the first update (the EMA starts as a copy of the parameters), then `decay`, or with
  `warmup` min(decay, 1 - (1 + (step - 1) / gamma) ** -power)."""
  t = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
  value = jnp.minimum(decay, 1.0 - (1.0 + t / gamma) ** -power) if warmup else jnp.asarray(decay, jnp.float32)
  return jnp.where(t <= 0, 0.0, jnp.maximum(value, 0.0))


def update_ema(ema: dict, params: Any, batch_stats: Any, decay) -> dict:
  """ema <- decay * ema + (1 - decay) * new, for the parameters and the BatchNorm statistics (timm: all
  floating-point state), in float32."""
  mix = lambda e, x: (decay * e + (1.0 - decay) * x.astype(e.dtype)).astype(e.dtype)
  return {"params": jax.tree.map(mix, ema["params"], params),
          "batch_stats": jax.tree.map(mix, ema["batch_stats"], batch_stats)}


def has_ema(state_or_shardings) -> bool:
  return bool(jax.tree.leaves(state_or_shardings.ema))


def ema_view(state: TrainState) -> TrainState:
  """`state` with the EMA parameters and statistics in place of the raw ones (for evaluation)."""
  return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
                    ema: bool = False):
  """(abstract TrainState with shardings attached, TrainState of NamedShardings).

  Only traces (eval_shape): bad image sizes and the like fail here, before any compilation.
  `ema`: the state holds an EMA of the parameters and statistics (laid out as they are).
  """
  boxed = registry.abstract_variables(model)
  var_shardings = shd.variable_shardings(boxed, mesh)
  variables = nn.meta.unbox(boxed)
  params = variables["params"]
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = shd.match_by_path(opt_state, params, var_shardings["params"], mesh)
  repl = shd.replicated(mesh)
  ema_shardings = {"params": var_shardings["params"], "batch_stats": var_shardings.get("batch_stats", {})}
  shardings = TrainState(step=repl, params=var_shardings["params"], opt_state=opt_shardings,
                         batch_stats=var_shardings.get("batch_stats", {}), rng=repl,
                         ema=ema_shardings if ema else {})
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                        batch_stats=variables.get("batch_stats", {}),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        ema={"params": params, "batch_stats": variables.get("batch_stats", {})} if ema else {})
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       seed: int, variables: dict | None = None, shardings: TrainState | None = None) -> TrainState:
  """A new TrainState created already sharded (jit with out_shardings; no full copy on one device).

  `variables` (e.g. pretrained weights) replace the random initialisation.  `shardings`: those
  `state_shardings` returned, when already computed (their `ema` says whether the state keeps an EMA, which
  starts as a copy of the parameters).
  """
  if shardings is None:
    _, shardings = state_shardings(model, tx, mesh)
  with_ema = has_ema(shardings)
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  train_rng = jax.random.key_data(train_rng)  # raw uint32[2]: a plain array in the checkpoint

  def init(init_rng, train_rng, variables):
    if variables is None:
      variables = nn.meta.unbox(registry.init_variables(model, init_rng))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    ema = {"params": jax.tree.map(jnp.copy, params), "batch_stats": jax.tree.map(jnp.copy, batch_stats)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=batch_stats, rng=train_rng, ema=ema if with_ema else {})

  if variables is not None:
    variables = {k: v for k, v in nn.meta.unbox(variables).items() if k in ("params", "batch_stats")}
    variables = jax.device_put(variables, {"params": shardings.params, "batch_stats": shardings.batch_stats}
                               if "batch_stats" in variables else {"params": shardings.params})
  return jax.jit(init, out_shardings=shardings)(init_rng, train_rng, variables)
