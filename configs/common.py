"""Shared pieces of the experiment configs (one ``get_config`` per file, big_vision style)."""

from __future__ import annotations

import dataclasses

import ml_collections

from asymflow_jax.data.pipeline import default_data_config, tfds_data_config
from asymflow_jax.models.jit import JiTConfig, jit_config


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """Every JiTConfig field spelled out, so sweeps can override any of them on the command line."""
  m = ml_collections.ConfigDict(dataclasses.asdict(jit_config(size, **overrides)))
  m.size = size                 # informational
  m.rank = 8                    # subspace rank r (0 = JiT x0-prediction, D = velocity prediction)
  m.projected_init = True       # write the basis into the first r bottleneck channels (needs r <= bottleneck)
  m.dtype = "float32"           # compute dtype: float32 | bfloat16 (params stay float32)
  m.remat = False
  m.remat_policy = "nothing_saveable"
  return m


def jit_config_from(m: ml_collections.ConfigDict) -> JiTConfig:
  return JiTConfig(**{f.name: m[f.name] for f in dataclasses.fields(JiTConfig)})


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


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024           # global batch
  c.num_steps = 750_600
  # optimiser (spec section 4): AdamW, constant lr after an mmcv-style linear warm-up
  c.lr = 2e-4
  c.warmup_steps = 6255
  c.warmup_ratio = 1e-8
  c.b1, c.b2, c.eps = 0.9, 0.95, 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 0.0             # 0 = off
  c.ema_decays = (0.9999,)
  # flow matching (spec section 4)
  c.prob_class = 0.9            # labels kept with this probability, else the null class
  c.sigma_mean, c.sigma_std = 0.8, 0.8   # sigma = sigmoid(mean + std * n)
  c.sigma_shift = 1.0
  c.sigma_clip_min = 1e-4
  c.loss_sigma_min = 0.05       # w = sigma / max(sigma, 0.05)
  # subspace
  c.subspace = ml_collections.ConfigDict()
  c.subspace.kind = "pca"       # pca | random | file
  c.subspace.path = ""          # for kind=file
  c.subspace.num_images = 10_000
  c.subspace.seed = 2021
  # mesh: data x fsdp x tensor; -1 = the remaining devices
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # checkpointing
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5000
  c.checkpoint.keep = 3
  c.checkpoint.keep_every = 50_000   # 0 = none
  c.checkpoint.async_save = True
  # logging and sampling
  c.log_every = 100
  c.sample = ml_collections.ConfigDict()
  c.sample.every = 0            # 0 = only at the end
  c.sample.num_steps = 50
  c.sample.method = "heun"
  c.sample.guidance = 2.3       # ImageNet: 2.3 on [0, 0.88]
  c.sample.interval = (0.0, 0.88)
  c.sample.num_images = 64
  # in-training evaluation (samples with the settings above), logged as eval_* scalars
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0              # 0 = off
  c.eval.num_images = 1000
  c.eval.metric = "fid"         # fid (needs inception + reference) | fdd (embedded digits)
  c.eval.inception = ""         # FID Inception weights .npz (docs/evaluation.md)
  c.eval.reference = ""         # ADM reference statistics .npz
  return c


# Mesh recipes (data, fsdp, tensor) for the paper's batch 1024, and the model sizes that fit without
# remat on that slice (derivation: launch/README.md, "Memory per device"). Select one with
# --config=configs/imagenet256_h16.py:v5p-64 (combine with runlocal as "runlocal,v5p-64").
MESH_RECIPES = {
    "v4-32": ((1, -1, 1), ("B/16",)),
    "v5e-64": ((1, -1, 1), ("B/16",)),
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
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.subspace.num_images = 64
  c.sample.num_images = 8
  c.sample.num_steps = 2
