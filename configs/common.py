"""Shared pieces of the experiment configs (one ``get_config`` per file, big_vision style)."""

from __future__ import annotations

import ml_collections

from asymflow_jax.config import base_config, model_config  # noqa: F401  (the schema lives in the package)
from asymflow_jax.data.pipeline import default_data_config, tfds_data_config


def mnist_data() -> ml_collections.ConfigDict:
  return default_data_config()


def imagenet_data(image_size: int) -> ml_collections.ConfigDict:
  return tfds_data_config("imagenet2012", image_size=image_size)


def imagenet256_config(size: str, arg: str | None = None, **model_overrides) -> ml_collections.ConfigDict:
  """The paper's ImageNet-256 AsymFlow recipe (spec section 4) for a JiT size.

  Data: TFDS imagenet2012 prepared as array_record (ADM centre crop 256, random flip); the
  workdir is a filesystem path shared by all hosts (e.g. a bucket mounted with gcsfuse).
  Rank-8 PCA subspace of 10k training images. AdamW lr 2e-4, betas (0.9, 0.95), wd 0, 5-epoch
  linear warm-up (6255 it), batch 1024, 750,600 iterations; EMA 0.9999; bf16 compute with fp32
  master weights and attention, remat. Sampling: Heun 50 steps, CFG 2.3 on sigma in [0, 0.88].
  """
  c = base_config()
  c.data = imagenet_data(256)
  c.model = model_config(size, **model_overrides)
  c.model.rank = 8
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.subspace.num_images = 10_000
  c.subspace.seed = 2021
  return apply_arg(c, arg)


# Mesh recipes (data, fsdp, tensor) for the paper's batch 1024, and the model sizes that fit without
# remat on that slice (TPU: the ahead-of-time compiled table of launch/README.md; GPU: its "Memory
# per device" estimate). Select one with
# --config=configs/imagenet256_h16.py:v5p-64 (combine with runlocal as "runlocal,v5p-64").
MESH_RECIPES = {
    "v4-32": ((1, -1, 1), ("B/16",)),
    "v5e-64": ((1, -1, 1), ("B/16", "L/16", "H/16")),
    "v5p-32": ((1, -1, 1), ("B/16", "L/16", "H/16")),   # 16 chips, 64 per chip: H/16 53.1 of 95 GiB compiled
    "v5p-64": ((1, -1, 1), ("B/16", "L/16", "H/16")),
    "v6e-64": ((1, -1, 1), ("B/16", "L/16", "H/16")),
    "h100": ((-1, 8, 1), ("B/16",)),   # n nodes x 8 GPUs: fsdp inside a node, nodes on data
}


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Config arguments after the colon, comma-separated: ``runlocal`` (a few quick CPU steps) and/or
  a mesh recipe name from :data:`MESH_RECIPES`."""
  for token in filter(None, (arg or "").split(",")):
    if token == "runlocal":
      _runlocal(c)
    elif token in MESH_RECIPES:
      (c.mesh.data, c.mesh.fsdp, c.mesh.tensor), no_remat = MESH_RECIPES[token]
      c.model.remat = c.model.size not in no_remat
    else:
      raise ValueError(f"unknown config argument {token!r}; expected 'runlocal' or one of {sorted(MESH_RECIPES)}.")
  return c


def _runlocal(c: ml_collections.ConfigDict):
  c.batch_size = 8
  c.num_steps = 4
  c.warmup_steps = 2
  c.log_every = 1
  c.steps_per_call = 1          # every step is logged
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.subspace.num_images = 64
  c.sample.num_images = 8
  c.sample.num_steps = 2
