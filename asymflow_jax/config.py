"""The experiment config: its schema (every field with its default), and validation before compile.

Experiment files in ``configs/`` start from :func:`base_config` and :func:`model_config` and change
values (big_vision style); :func:`validate_config` checks a finished config before anything is
built or compiled and names the field, its value and what was expected. :func:`structural_diff`
tells which differences between two configs change the shapes of the checkpointed state.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from etils import epath
import ml_collections

from asymflow_jax import sampling
from asymflow_jax import sharding as shd
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.models import jit_model

DTYPES = ("float32", "bfloat16")
SUBSPACE_KINDS = ("pca", "random", "file")
EVAL_METRICS = ("fdd", "fid")
IS_SPLITS = 10   # Inception Score splits: evaluation needs at least this many images


# ------------------------------------------------------------------------------------------ schema


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """Every JiTConfig field of a size preset spelled out (sweepable), plus the AsymFlow fields."""
  m = ml_collections.ConfigDict(dataclasses.asdict(jit_model.jit_config(size, **overrides)))
  m.size = size                 # informational
  m.rank = 8                    # subspace rank r (0 = JiT x0-prediction, D = velocity prediction)
  m.projected_init = True       # write the basis into the first r bottleneck channels (needs r <= bottleneck)
  m.dtype = "float32"           # compute dtype: float32 | bfloat16 (params stay float32)
  m.remat = False
  m.remat_policy = "nothing_saveable"
  return m


def base_config() -> ml_collections.ConfigDict:
  """All run fields with the paper's ImageNet-256 values (spec section 4); data and model are set
  by the experiment file (``default_data_config`` / :func:`model_config` give their fields)."""
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
  # subspace (computed or loaded on the first run; then it lives in the checkpoint)
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
  c.data = data_pipeline.default_data_config()
  c.model = model_config("tiny")
  return c


def _schema() -> ml_collections.ConfigDict:
  return base_config()


# -------------------------------------------------------------------------------------- validation


def _unknown_keys(config, schema, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=3)
      hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
      out.append(f"config.{name} does not exist{hint}")
    elif isinstance(schema[key], ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
      out.extend(_unknown_keys(config[key], schema[key], name + "."))
  return out


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(errors: list, ok: bool, field: str, value: Any, expected: str):
  if not ok:
    errors.append(f"config.{field}={value!r}: expected {expected}")


def _numeric_errors(c) -> list[str]:
  """Every numeric/enumerated field against its valid range."""
  e: list[str] = []
  pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
  nonneg_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
  finite = lambda v: _number(v) and math.isfinite(v)
  for field in ("batch_size", "num_steps", "log_every", "checkpoint.every", "checkpoint.keep",
                "subspace.num_images", "sample.num_steps", "sample.num_images", "eval.num_images"):
    _check(e, pos_int(_get(c, field)), field, _get(c, field), "an integer >= 1")
  for field in ("warmup_steps", "checkpoint.keep_every", "sample.every", "eval.every", "seed", "subspace.seed"):
    _check(e, nonneg_int(_get(c, field)), field, _get(c, field), "an integer >= 0")
  _check(e, finite(c.lr) and c.lr > 0, "lr", c.lr, "a finite number > 0")
  _check(e, finite(c.warmup_ratio) and 0 <= c.warmup_ratio <= 1, "warmup_ratio", c.warmup_ratio, "a number in [0, 1]")
  for field in ("b1", "b2"):
    _check(e, finite(c[field]) and 0 <= c[field] < 1, field, c[field], "a number in [0, 1)")
  _check(e, finite(c.eps) and c.eps > 0, "eps", c.eps, "a finite number > 0")
  _check(e, finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay, "a finite number >= 0")
  _check(e, finite(c.grad_clip) and c.grad_clip >= 0, "grad_clip", c.grad_clip, "a finite number >= 0 (0 = off)")
  decays = tuple(c.ema_decays) if isinstance(c.ema_decays, (tuple, list)) else None
  _check(e, bool(decays) and all(finite(d) and 0 <= d < 1 for d in decays), "ema_decays", c.ema_decays,
         "a non-empty tuple of numbers in [0, 1)")
  _check(e, finite(c.prob_class) and 0 <= c.prob_class <= 1, "prob_class", c.prob_class, "a number in [0, 1]")
  _check(e, finite(c.sigma_mean), "sigma_mean", c.sigma_mean, "a finite number")
  _check(e, finite(c.sigma_std) and c.sigma_std >= 0, "sigma_std", c.sigma_std, "a finite number >= 0")
  _check(e, finite(c.sigma_shift) and c.sigma_shift > 0, "sigma_shift", c.sigma_shift, "a finite number > 0")
  _check(e, finite(c.sigma_clip_min) and 0 < c.sigma_clip_min < 1, "sigma_clip_min", c.sigma_clip_min,
         "a number in (0, 1)")
  _check(e, finite(c.loss_sigma_min) and c.loss_sigma_min > 0, "loss_sigma_min", c.loss_sigma_min,
         "a finite number > 0")
  s = c.sample
  _check(e, s.method in sampling.METHODS, "sample.method", s.method, f"one of {sampling.METHODS}")
  _check(e, finite(s.guidance) and s.guidance >= 0, "sample.guidance", s.guidance, "a finite number >= 0")
  iv = tuple(s.interval) if isinstance(s.interval, (tuple, list)) else ()
  _check(e, len(iv) == 2 and all(finite(v) for v in iv) and 0 <= iv[0] <= iv[1] <= 1, "sample.interval",
         s.interval, "(lo, hi) with 0 <= lo <= hi <= 1")
  _check(e, c.eval.metric in EVAL_METRICS, "eval.metric", c.eval.metric, f"one of {EVAL_METRICS}")
  m = c.model
  _check(e, m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "bottleneck_dim",
                "num_classes"):
    _check(e, pos_int(m[field]), f"model.{field}", m[field], "an integer >= 1")
  for field in ("attn_dropout", "proj_dropout"):
    _check(e, finite(m[field]) and 0 <= m[field] < 1, f"model.{field}", m[field], "a number in [0, 1)")
  _check(e, c.subspace.kind in SUBSPACE_KINDS, "subspace.kind", c.subspace.kind, f"one of {SUBSPACE_KINDS}")
  return e


def _get(c, dotted: str):
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


def validate_config(config, num_devices: int, process_count: int = 1, *, training: bool = True,
                    check_files: bool = True):
  """Fails fast, before any compile, with one message listing every problem (field, value, expectation).

  Args:
    config: a finished experiment config.
    num_devices: devices the mesh will span. process_count: JAX processes (the batch is split over them).
    training: False for sampling/evaluation (the batch and mesh of training are not checked).
    check_files: also check that the files the config names (subspace file, FID inputs) exist.
  """
  errors = _unknown_keys(config, _schema())
  if errors:  # the remaining checks would only repeat the confusion
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
  errors = _numeric_errors(config)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
  m = config.model
  if m.input_size % m.patch_size:
    errors.append(f"config.model.input_size={m.input_size} is not divisible by patch_size={m.patch_size}.")
  if m.input_size != config.data.image_size or m.in_channels != config.data.num_channels:
    errors.append(f"model input {m.input_size}x{m.input_size}x{m.in_channels} does not match the data "
                  f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels}.")
  d = m.patch_size ** 2 * m.in_channels
  if not isinstance(m.rank, int) or not 0 <= m.rank <= d:
    errors.append(f"config.model.rank={m.rank} is outside [0, D={d}] (D = patch_size^2 * in_channels).")
  elif m.projected_init and m.rank > m.bottleneck_dim:
    errors.append(f"config.model.rank={m.rank} exceeds bottleneck_dim={m.bottleneck_dim}: the projected init "
                  "writes the basis into the first r bottleneck channels. Set config.model.projected_init=False "
                  "(e.g. for r = D, plain velocity prediction) or lower the rank.")
  try:
    sizes = shd.mesh_shape(config.mesh, num_devices)
  except ValueError as err:
    errors.append(str(err))
  else:
    divisor = sizes[0] * sizes[1]
    if training and config.batch_size % divisor:
      errors.append(f"config.batch_size={config.batch_size} is not divisible by data x fsdp = {divisor} "
                    f"(mesh {dict(zip(shd.MESH_AXES, sizes))}).")
  if training and config.batch_size % process_count:
    errors.append(f"config.batch_size={config.batch_size} is not divisible by the {process_count} processes.")
  if config.subspace.kind == "file" and not config.subspace.path:
    errors.append("config.subspace.kind='file' needs config.subspace.path (a subspace .npz).")
  e = config.eval
  if e.every:
    if e.metric == "fid" and not (e.inception and e.reference):
      errors.append("config.eval.every is set with metric 'fid' but config.eval.inception / config.eval.reference "
                    "are empty; give both .npz paths (docs/evaluation.md) or use metric 'fdd' for digits.")
    if e.metric == "fid" and e.num_images < IS_SPLITS:
      errors.append(f"config.eval.num_images={e.num_images}: the Inception Score needs at least {IS_SPLITS}.")
  if check_files:
    named = [("subspace.path", config.subspace.path if config.subspace.kind == "file" else "")]
    if e.every and e.metric == "fid":
      named += [("eval.inception", e.inception), ("eval.reference", e.reference)]
    for field, path in named:
      if path and not epath.Path(path).exists():
        errors.append(f"config.{field}={path!r} does not exist.")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------- resume compatibility

# Fields that do not change the shapes or structure of the checkpointed state.
_NON_STRUCTURAL_MODEL = ("size", "dtype", "remat", "remat_policy", "attn_dropout", "proj_dropout")


def structural_diff(stored, new) -> list[str]:
  """``field: stored -> new`` for each difference that changes the checkpointed state's structure
  (model architecture and rank, number of EMA trees, gradient clipping on/off)."""
  out = []
  sm, nm = stored.get("model", {}), new.get("model", {})
  for key in sorted(set(sm) | set(nm)):
    if key not in _NON_STRUCTURAL_MODEL and sm.get(key) != nm.get(key):
      out.append(f"model.{key}: {sm.get(key)!r} -> {nm.get(key)!r}")
  if len(stored.get("ema_decays", ())) != len(new.get("ema_decays", ())):
    out.append(f"ema_decays: {tuple(stored.get('ema_decays', ()))} -> {tuple(new.get('ema_decays', ()))} "
               "(a different number of EMA trees)")
  if (stored.get("grad_clip", 0) > 0) != (new.get("grad_clip", 0) > 0):
    out.append(f"grad_clip: {stored.get('grad_clip')!r} -> {new.get('grad_clip')!r} (optimizer state structure)")
  return out
