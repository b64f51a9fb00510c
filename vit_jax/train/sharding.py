"""Device mesh and logical-axis sharding rules (jit + NamedSharding, no pmap).

The mesh has three axes:

  data    plain data parallelism: the batch is split, parameters are replicated
  fsdp    ZeRO-3 / fully-sharded data parallelism: the batch is split *and*
          parameters plus optimiser state are sharded along their `embed` dim
  tensor  Megatron-style tensor parallelism of attention heads and MLP width

The models annotate every parameter with logical axis names (see
`vit_jax.models.layers`); `LOGICAL_RULES` maps them onto the mesh.  A dim whose
size the mesh axis does not divide is replicated instead (e.g. 3 heads on a
tensor axis of 2), so every model runs on every mesh.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dim is split over both data-parallel axes

# logical name -> mesh axis (None: replicated).
LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("classes", None),
    ("conv_in", None),
    ("layers", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves `{data, fsdp, tensor}` (at most one -1 = the remaining devices) to sizes.

  Raises a ValueError naming the sizes when the mesh does not fit `num_devices`.
  """
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}.")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not "
                       f"divide the {num_devices} available devices.")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed > num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but only {num_devices} "
                     f"are available; shrink it or use -1 on one axis to fill the devices.")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes).

  A mesh smaller than the device count uses the first devices (handy for
  comparing meshes in one process); with several processes it must use all.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  n = math.prod(shape)
  if n < len(devices) and jax.process_count() > 1:
    raise ValueError(f"with {jax.process_count()} processes the mesh must span all {len(devices)} devices, "
                     f"got {dict(zip(MESH_AXES, shape))}; use -1 on one axis.")
  # Auto axes: Flax's logical partitioning uses GSPMD-style sharding constraints.
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices[:n])
  except NotImplementedError:
    # An axis that is no product of whole torus axes (e.g. fsdp=128 on a 16x16 v6e): split a physical axis.
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices[:n], allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


# Rank of each array of an input batch: image [B, h, w, 3], label [B], mask [B] (False = padding).
BATCH_NDIMS = {"image": 4, "label": 1, "mask": 1}
TRAIN_KEYS = ("image", "label")
EVAL_KEYS = ("image", "label", "mask")


def batch_shardings(mesh: jax.sharding.Mesh, keys: Sequence[str] = TRAIN_KEYS) -> dict[str, NamedSharding]:
  """{key: sharding} for the arrays `keys` of an input batch, each split over data x fsdp."""
  return {k: batch_sharding(mesh, BATCH_NDIMS[k]) for k in keys}


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """PartitionSpec for one array with logical `names`; dims the mesh axis does not divide are replicated."""
  if not names:
    return P()
  rule = dict(rules)
  spec, used = [], set()
  for name, size in zip(names, shape):
    axis = rule.get(name) if name is not None else None
    if name is not None and name not in rule:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rule)}.")
    axes = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
    axes = tuple(a for a in axes if a not in used)
    width = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or width == 1 or size % width:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def variable_shardings(boxed_abstract: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for an (abstract) variable tree that still carries Flax partitioning boxes.

  The result has the structure of the *unboxed* tree.  Arrays without
  annotations are replicated.
  """
  def one(x):
    if _is_box(x):
      return NamedSharding(mesh, spec_for(x.names, x.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_abstract, is_leaf=_is_box)


def match_by_path(tree_abstract: Any, reference: Any, reference_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for `tree_abstract` (e.g. an optax state) borrowed from `reference` (the params).

  A leaf whose key path ends with the key path of a reference leaf of the same
  shape (optax's mu/nu/trace mirror the params) gets that leaf's sharding;
  anything else (counters, scalars) is replicated.
  """
  by_path = {}
  for (path, ref), shd in zip(jax.tree_util.tree_leaves_with_path(reference),
                              jax.tree_util.tree_leaves(reference_shardings)):
    by_path[tuple(path)] = (tuple(np.shape(ref)), shd)

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree_abstract)


def describe(mesh: jax.sharding.Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.size} devices)"
