"""Activation layout hints shared by the backbones (sharding constraints inside the model)."""

from __future__ import annotations

import jax


def constrain_batch(x, sharding):
  """``x`` (B, ...) constrained to ``sharding``'s batch split (its first spec entry), other axes
  replicated; a no-op when ``sharding`` is None. Keeps XLA from replicating activations when the
  FSDP-sharded weights pull it the other way (seen inside the layer scans: terabytes of replicated
  temporaries in the TPU compile of a scanned model without it)."""
  if sharding is None:
    return x
  spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(sharding.mesh, spec))
