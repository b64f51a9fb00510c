"""The train state and its creation directly in its sharded layout.

`TrainState` holds everything a resume needs from the devices: step, params,
optimiser state, BatchNorm statistics (MaxViT; empty otherwise) and the base
RNG key (raw uint32 data so that Orbax stores it as a plain array).
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


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract TrainState with shardings attached, TrainState of NamedShardings).

  Only traces (eval_shape): bad image sizes and the like fail here, before any compilation.
  """
  boxed = registry.abstract_variables(model)
  var_shardings = shd.variable_shardings(boxed, mesh)
  variables = nn.meta.unbox(boxed)
  params = variables["params"]
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = shd.match_by_path(opt_state, params, var_shardings["params"], mesh)
  repl = shd.replicated(mesh)
  shardings = TrainState(step=repl, params=var_shardings["params"], opt_state=opt_shardings,
                         batch_stats=var_shardings.get("batch_stats", {}), rng=repl)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                        batch_stats=variables.get("batch_stats", {}),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       seed: int, variables: dict | None = None, shardings: TrainState | None = None) -> TrainState:
  """A new TrainState created already sharded (jit with out_shardings; no full copy on one device).

  `variables` (e.g. pretrained weights) replace the random initialisation.  `shardings`: those
  `state_shardings` returned, when already computed.
  """
  if shardings is None:
    _, shardings = state_shardings(model, tx, mesh)
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  train_rng = jax.random.key_data(train_rng)  # raw uint32[2]: a plain array in the checkpoint

  def init(init_rng, train_rng, variables):
    if variables is None:
      variables = nn.meta.unbox(registry.init_variables(model, init_rng))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=variables.get("batch_stats", {}), rng=train_rng)

  if variables is not None:
    variables = {k: v for k, v in nn.meta.unbox(variables).items() if k in ("params", "batch_stats")}
    variables = jax.device_put(variables, {"params": shardings.params, "batch_stats": shardings.batch_stats}
                               if "batch_stats" in variables else {"params": shardings.params})
  return jax.jit(init, out_shardings=shardings)(init_rng, train_rng, variables)
