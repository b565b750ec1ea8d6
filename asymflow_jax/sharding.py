"""Device mesh, logical-axis sharding rules and global batch assembly.

The mesh has three axes (maxtext style):

* ``data``   pure data parallelism (parameters replicated across it),
* ``fsdp``   data parallelism with parameters/optimizer state sharded across it (ZeRO-3),
* ``tensor`` tensor parallelism over attention heads and MLP width.

The batch is split over (data, fsdp). Model parameters carry logical axis names (see
``asymflow_jax.models.jit_model``); :data:`LOGICAL_RULES` maps them to mesh axes. A dimension whose
size is not divisible by its mesh axes is left replicated rather than failing to lower.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import flax.linen as nn

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or None = replicated)
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("adaln", "tensor"),
    ("vocab", None),
    ("patch", None),
    ("bottleneck", None),
    ("freq", None),
    ("context", None),
    ("head_dim", None),
    ("layers", None),   # the stacked-layer axis of scanned blocks (models.flux2)
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves (data, fsdp, tensor) sizes; one of them may be -1 (= the remaining devices)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set one axis to -1 or match the device count.")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def logical_to_sharding(logical_specs, abstract_tree, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree from its logical PartitionSpecs and shapes."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                      mesh_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def stacked(sharding: NamedSharding) -> NamedSharding:
  """``sharding`` with a new, unsharded leading axis (K batches stacked for a K-step call)."""
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def global_batch(local_batch: dict, mesh, *, stacked_steps: bool = False) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes;
  ``stacked_steps``: each leaf is (K, local B, ...), K batches for a K-step call (the K axis unsharded)."""
  def sharding(v):
    return stacked(batch_sharding(mesh, np.ndim(v) - 1)) if stacked_steps else batch_sharding(mesh, np.ndim(v))
  return {k: jax.make_array_from_process_local_data(sharding(v), np.asarray(v)) for k, v in local_batch.items()}
