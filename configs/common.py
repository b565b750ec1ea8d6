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
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """``--config=configs/x.py:runlocal`` shrinks a config to a few quick CPU steps."""
  if not arg:
    return c
  if arg != "runlocal":
    raise ValueError(f"unknown config argument {arg!r}; expected 'runlocal' or nothing.")
  c.batch_size = 8
  c.num_steps = 4
  c.warmup_steps = 2
  c.log_every = 1
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.subspace.num_images = 64
  c.sample.num_images = 8
  c.sample.num_steps = 2
  return c
