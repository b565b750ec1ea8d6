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
import numpy as np

from asymflow_jax import sampling
from asymflow_jax import sharding as shd
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.data import sources
from asymflow_jax.data import t2i
from asymflow_jax.models import attention, backbone, flux2, jit_model, repa

DTYPES = ("float32", "bfloat16")
SUBSPACE_KINDS = ("pca", "random", "file")
EVAL_METRICS = ("fdd", "fid")
OBJECTIVES = ("flow", "asymflow_vr")
EMA_POLICIES = ("fixed", "karras")
COLOR_SPACES = ("rgb", "oklab")
ATTENTION_IMPLS = attention.IMPLS
T2I_METHODS = ("unipc",)      # the text-to-image sampler (asymflow_jax.t2i_sampling)
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
  m.scan_layers = False         # jit: scan each run of identical blocks (faster compiles; same parameter tree)
  m.color_space = "rgb"         # pixel representation: rgb (identity on [-1, 1]) | oklab (normalised, spec s8)
  # backbone: jit (AsymJiT, the fields above) | asymflux2 (a lifted FLUX.2, text-to-image; spec s8). For
  # asymflux2 the transformer is model.flux2 (the *latent* FLUX.2 config, diffusers field names) and the
  # JiT-only fields (hidden_size, depth, bottleneck_dim, ...) are unused; input_size, patch_size,
  # in_channels, rank (= the latent token width), dtype, remat and color_space apply to both.
  m.family = "jit"
  m.attention_impl = "einsum"   # einsum (explicit float32 softmax, exact parity) | dot_product_attention
                                # (jax.nn.dot_product_attention: cuDNN flash attention on GPUs, bf16 operands)
                                # | splash (the TPU splash-attention kernel; Pallas interpreter on CPU)
  m.text_length = 512           # asymflux2: prompt tokens per example (the klein pipeline's max_sequence_length)
  m.flux2 = ml_collections.ConfigDict(_flux2_fields(flux2.flux2_klein_9b()))
  return m


def _flux2_fields(cfg: flux2.Flux2Config) -> dict:
  d = cfg.to_dict()
  d.pop("out_channels")         # the pixel model's output width is p*p*C
  d["axes_dims_rope"] = tuple(d["axes_dims_rope"])
  return d


def asymflux2_model_config(input_size: int = 1024, *, latent: flux2.Flux2Config | None = None,
                           **overrides) -> ml_collections.ConfigDict:
  """``config.model`` of an AsymFLUX.2 (spec s8): FLUX.2 klein base 9B (or ``latent``) lifted to
  16x16 pixel patches, RGB in Oklab, rank 128 (the latent token width)."""
  latent = latent or flux2.flux2_klein_9b()
  m = model_config("tiny")
  m.family, m.size = "asymflux2", "flux2"
  m.flux2 = ml_collections.ConfigDict(_flux2_fields(latent))
  m.update(input_size=input_size, patch_size=16, in_channels=3, rank=latent.in_channels, projected_init=False,
           color_space="oklab", num_classes=1)
  m.update(overrides)
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
  c.grad_clip_start = 0         # clip only from this step on (the lift recipe: 100)
  c.ema_decays = (0.9999,)
  c.ema_policy = "fixed"        # fixed: ema_decays | karras: momentum (1 - 1/t)^(gamma + 1), t = step + 1 - ema_start
  c.ema_start = 0               # karras: the EMA copies the weights before this step
  c.ema_gamma = 7.0
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
  # K train steps per jitted call (lax.scan over K batches): the same updates, one device call and
  # one allocation of the step's temporaries per K steps. Calls that would pass a log, checkpoint,
  # eval or sample step inside them run one step at a time instead.
  c.steps_per_call = 1
  # logging and sampling
  c.log_every = 100
  c.sample = ml_collections.ConfigDict()
  c.sample.every = 0            # 0 = only at the end
  c.sample.num_steps = 50
  c.sample.method = "heun"
  c.sample.guidance = 2.3       # ImageNet: 2.3 on [0, 0.88]
  c.sample.interval = (0.0, 0.88)
  c.sample.num_images = 64       # images per grid; 0 = no sample grids (e.g. when sampling is done separately)
  c.sample.sigma_min = 4e-2     # recovery clamp at inference (ImageNet 4e-2; the latent lift keeps 1e-4)
  # text-to-image (model.family='asymflux2', method 'unipc'): spec s8 uses 32 steps, guidance 4, orthogonal 1
  c.sample.orthogonal = 0.0     # orthogonal-guidance weight (0 = plain CFG)
  c.sample.shift = 0.0          # sigma shift of the UniPC schedule; 0 = the dynamic shift of the resolution
  c.sample.clamp_denoised = True
  # in-training evaluation (samples with the settings above), logged as eval_* scalars
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0              # 0 = off
  c.eval.num_images = 1000
  c.eval.metric = "fid"         # fid (needs inception + reference) | fdd (embedded digits)
  c.eval.inception = ""         # FID Inception weights .npz (docs/evaluation.md)
  c.eval.reference = ""         # ADM reference statistics .npz
  # objective: flow (spec section 4) | asymflow_vr (latent-lift finetuning, spec section 8)
  c.objective = "flow"
  c.vr = ml_collections.ConfigDict()
  c.vr.latent_key = "latent"    # batch key of the cached latents z (data.extra_keys must name it)
  c.vr.latent_patch_size = 2    # latent tokens are p_l x p_l patches of z
  c.vr.loss_shift = 0.3         # rho(sigma) = (1-sigma)^2 / ((1-sigma)^2 + (shift sigma)^2); 0 = off (rho = 0)
  c.vr.mse_weight = 5.0         # effective weight (the reference's 0.5 x mse_loss_weight 10)
  c.vr.lpips_weight = 1.0       # 0 = no LPIPS term
  c.vr.lpips_net = "vgg"
  c.vr.lpips_samples = 0        # LPIPS on the first n samples of the batch only (0 = all, the reference)
  c.vr.lpips_chunks = 1         # LPIPS over the n samples in this many slices, one after another, each
                                # recomputed in the backward: ~1/chunks of its activation memory, same values
  c.vr.coef_eps = 1e-4          # vr coefficient denominator floor
  c.vr.teacher_sigma_min = 1e-4  # the frozen teacher's (eval-mode) recovery clamp
  # finetuning from a base workdir (converted or lifted weights); '' = train every parameter
  c.finetune = ml_collections.ConfigDict()
  c.finetune.base = ""          # workdir whose weights are the frozen base (and the VR teacher)
  c.finetune.weights = "params"  # which tree of the base: params | ema_<i>
  c.finetune.trainable = ()     # regexes of parameter paths trained in full, e.g. ("x_embedder", "final_layer")
  c.finetune.lr_mults = ()      # ((regex, multiplier), ...): first match wins, e.g. (("final_layer/linear", 10.0),)
  c.finetune.lora_rank = 0      # 0 = no LoRA
  c.finetune.lora_alpha = 0.0   # 0 = rank (scale alpha / rank = 1, as the reference)
  c.finetune.lora_dropout = 0.0
  c.finetune.lora_targets = ()  # regexes of Dense module paths, e.g. ("mlp/w12", "mlp/w3", "t_embedder")
  # REPA (spec section 5): align the hidden state after ``block`` with a frozen encoder; weight 0 = off
  c.repa = ml_collections.ConfigDict()
  c.repa.weight = 0.0           # the paper: 0.5 (loss = flow - weight * mean cosine similarity)
  c.repa.block = 7              # features after this block, 0-based (the paper's "encoder_depth 8")
  c.repa.projector_dim = 2048   # width of the 3-layer SiLU projector
  c.repa.encoder = "dinov2_base"  # dinov2_{small,base,large,giant,tiny} | vgg16 (the LPIPS package's ImageNet VGG16)
  c.repa.encoder_path = ""      # dinov2: a transformers checkpoint folder (config.json + safetensors)
  c.repa.encoder_dtype = "bfloat16"  # the frozen encoder's params and compute
  c.repa.vgg_tap = 2            # vgg16: relu1_2 .. relu5_3 = 0 .. 4 (input = grid * 2^tap px)
  c.data = data_pipeline.default_data_config()
  c.model = model_config("tiny")
  return c


def _schema() -> ml_collections.ConfigDict:
  return base_config()


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
  """A stored config (plain dict, e.g. an older workdir's config.json) with every field that it
  lacks filled in from the schema defaults; stored values win."""
  def merge(defaults, values):
    out = dict(defaults)
    for k, v in values.items():
      out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
  return ml_collections.ConfigDict(merge(base_config().to_dict(), stored))


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
  for field in ("batch_size", "num_steps", "steps_per_call", "log_every", "checkpoint.every", "checkpoint.keep",
                "subspace.num_images", "sample.num_steps", "eval.num_images"):
    _check(e, pos_int(_get(c, field)), field, _get(c, field), "an integer >= 1")
  for field in ("warmup_steps", "checkpoint.keep_every", "sample.every", "sample.num_images", "eval.every", "seed",
                "subspace.seed"):
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
  methods = T2I_METHODS if c.model.get("family", "jit") == "asymflux2" else sampling.METHODS
  _check(e, s.method in methods, "sample.method", s.method, f"one of {methods} for model.family="
         f"{c.model.get('family', 'jit')!r}")
  _check(e, finite(s.orthogonal) and 0 <= s.orthogonal <= 1, "sample.orthogonal", s.orthogonal, "a number in [0, 1]")
  _check(e, finite(s.shift) and s.shift >= 0, "sample.shift", s.shift, "a number >= 0 (0 = dynamic)")
  _check(e, finite(s.guidance) and s.guidance >= 0, "sample.guidance", s.guidance, "a finite number >= 0")
  iv = tuple(s.interval) if isinstance(s.interval, (tuple, list)) else ()
  _check(e, len(iv) == 2 and all(finite(v) for v in iv) and 0 <= iv[0] <= iv[1] <= 1, "sample.interval",
         s.interval, "(lo, hi) with 0 <= lo <= hi <= 1")
  _check(e, finite(s.sigma_min) and 0 < s.sigma_min < 1, "sample.sigma_min", s.sigma_min, "a number in (0, 1)")
  _check(e, c.eval.metric in EVAL_METRICS, "eval.metric", c.eval.metric, f"one of {EVAL_METRICS}")
  m = c.model
  _check(e, m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "bottleneck_dim",
                "num_classes"):
    _check(e, pos_int(m[field]), f"model.{field}", m[field], "an integer >= 1")
  for field in ("attn_dropout", "proj_dropout"):
    _check(e, finite(m[field]) and 0 <= m[field] < 1, f"model.{field}", m[field], "a number in [0, 1)")
  _check(e, c.subspace.kind in SUBSPACE_KINDS, "subspace.kind", c.subspace.kind, f"one of {SUBSPACE_KINDS}")
  _check(e, m.color_space in COLOR_SPACES, "model.color_space", m.color_space, f"one of {COLOR_SPACES}")
  _check(e, nonneg_int(c.grad_clip_start), "grad_clip_start", c.grad_clip_start, "an integer >= 0")
  _check(e, c.ema_policy in EMA_POLICIES, "ema_policy", c.ema_policy, f"one of {EMA_POLICIES}")
  _check(e, nonneg_int(c.ema_start), "ema_start", c.ema_start, "an integer >= 0")
  _check(e, finite(c.ema_gamma) and c.ema_gamma >= 0, "ema_gamma", c.ema_gamma, "a finite number >= 0")
  _check(e, c.objective in OBJECTIVES, "objective", c.objective, f"one of {OBJECTIVES}")
  v = c.vr
  _check(e, pos_int(v.latent_patch_size), "vr.latent_patch_size", v.latent_patch_size, "an integer >= 1")
  _check(e, nonneg_int(v.lpips_samples), "vr.lpips_samples", v.lpips_samples, "an integer >= 0 (0 = all)")
  _check(e, pos_int(v.lpips_chunks), "vr.lpips_chunks", v.lpips_chunks, "an integer >= 1")
  if pos_int(v.lpips_chunks) and nonneg_int(v.lpips_samples) and pos_int(c.batch_size):
    n = min(v.lpips_samples, c.batch_size) if v.lpips_samples else c.batch_size
    _check(e, n % v.lpips_chunks == 0, "vr.lpips_chunks", v.lpips_chunks,
           f"a divisor of the {n} samples LPIPS sees (batch_size / vr.lpips_samples)")
  _check(e, v.lpips_net == "vgg", "vr.lpips_net", v.lpips_net, "'vgg' (the reference's LPIPS network)")
  for field in ("loss_shift", "mse_weight", "lpips_weight"):
    _check(e, finite(v[field]) and v[field] >= 0, f"vr.{field}", v[field], "a finite number >= 0")
  for field in ("coef_eps", "teacher_sigma_min"):
    _check(e, finite(v[field]) and v[field] > 0, f"vr.{field}", v[field], "a finite number > 0")
  f = c.finetune
  _check(e, nonneg_int(f.lora_rank), "finetune.lora_rank", f.lora_rank, "an integer >= 0 (0 = no LoRA)")
  _check(e, finite(f.lora_alpha) and f.lora_alpha >= 0, "finetune.lora_alpha", f.lora_alpha, "a finite number >= 0")
  _check(e, finite(f.lora_dropout) and 0 <= f.lora_dropout < 1, "finetune.lora_dropout", f.lora_dropout,
         "a number in [0, 1)")
  pairs = tuple(f.lr_mults) if isinstance(f.lr_mults, (tuple, list)) else None
  _check(e, pairs is not None and all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                                      and finite(p[1]) and p[1] > 0 for p in pairs),
         "finetune.lr_mults", f.lr_mults, "a tuple of (regex, multiplier > 0) pairs")
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
  errors += _family_errors(config, training)
  if not isinstance(m.rank, int) or not 0 <= m.rank <= d:
    errors.append(f"config.model.rank={m.rank} is outside [0, D={d}] (D = patch_size^2 * in_channels).")
  elif m.projected_init and m.family == "jit" and m.rank > m.bottleneck_dim:
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
  errors += _data_errors(config.data, training, check_files)
  errors += _finetune_errors(config)
  errors += _repa_errors(config, training, check_files)
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
    named = [("subspace.path", config.subspace.path if config.subspace.kind == "file" else ""),
             ("finetune.base", str(epath.Path(config.finetune.base) / "config.json") if config.finetune.base else "")]
    if e.every and e.metric == "fid":
      named += [("eval.inception", e.inception), ("eval.reference", e.reference)]
    for field, path in named:
      if path and not epath.Path(path).exists():
        errors.append(f"config.{field}={path!r} does not exist.")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _family_errors(config, training: bool) -> list[str]:
  """The backbone family and, for asymflux2, its FLUX.2 fields, rank and data."""
  m = config.model
  if m.family not in backbone.FAMILIES:
    return [f"config.model.family={m.family!r}: expected one of {backbone.FAMILIES}."]
  text_data = config.data.source == "t2i"
  errors = []
  if m.attention_impl not in ATTENTION_IMPLS:   # both families
    errors.append(f"config.model.attention_impl={m.attention_impl!r}: expected one of {ATTENTION_IMPLS}.")
  if m.family == "jit":
    if text_data and training:
      errors.append(f"config.data.source='t2i' (text-to-image) needs config.model.family='asymflux2', got "
                    f"{m.family!r}.")
    if m.attention_impl != "einsum" and m.attn_dropout > 0 and training:
      errors.append(f"config.model.attn_dropout={m.attn_dropout}: dropout on the attention probabilities needs "
                    f"config.model.attention_impl='einsum', got {m.attention_impl!r}.")
    return errors
  try:
    latent = flux2.Flux2Config.from_dict(dict(m.flux2))
  except (TypeError, ValueError) as e:
    return [f"config.model.flux2 is not a valid FLUX.2 config: {e}"]
  if m.rank != latent.in_channels:
    errors.append(f"config.model.rank={m.rank}: an AsymFLUX.2 basis maps the latent tokens, so the rank must be "
                  f"model.flux2.in_channels={latent.in_channels}.")
  if m.scan_layers:
    errors.append("config.model.scan_layers=True: the layer scan is implemented for the 'jit' family only; "
                  "set it to False for asymflux2.")
  if not (isinstance(m.text_length, int) and m.text_length >= 1):
    errors.append(f"config.model.text_length={m.text_length!r}: expected an integer >= 1.")
  if config.prob_class != 1.0:
    errors.append(f"config.prob_class={config.prob_class}: text-to-image training has no caption dropout (the "
                  "reference recipe); set it to 1.0.")
  if training and not text_data:
    errors.append(f"config.model.family='asymflux2' trains on text-to-image data: set config.data.source='t2i' "
                  f"(got {config.data.source!r}).")
  return errors


def _data_errors(d, training: bool, check_files: bool) -> list[str]:
  """The data source, its extra arrays, and (training; ``check_files``) an npz file against the config."""
  errors = []
  if d.source not in data_pipeline.SOURCES:
    return [f"config.data.source={d.source!r}: expected one of {data_pipeline.SOURCES}"]
  try:
    extra = data_pipeline.extra_keys_of(d)
  except ValueError as e:
    return [str(e)]
  if extra and d.random_flip:
    errors.append(f"config.data.random_flip=True with extra_keys {extra}: a flipped image would not match its "
                  "extra arrays (e.g. its latents); set config.data.random_flip=False.")
  if not training:
    return errors
  if d.source in ("npz", "array_record", "t2i") and not d.path:
    errors.append(f"config.data.source={d.source!r} needs config.data.path.")
  elif d.source == "t2i" and check_files:
    try:
      res = tuple(t2i.read_meta(d.path)["resolution"])
    except (OSError, ValueError) as e:
      errors.append(f"config.data.path={d.path!r}: {e}")
    else:
      if res != (d.image_size, d.image_size):
        errors.append(f"config.data.path={d.path!r} holds {res[0]}x{res[1]} images; the config trains at "
                      f"data.image_size={d.image_size} (square; set it and model.input_size to the dataset's).")
  elif d.source == "npz" and check_files:
    if not epath.Path(d.path).exists():
      errors.append(f"config.data.path={d.path!r} does not exist.")
    else:
      info = sources.npz_array_info(d.path)
      missing = [k for k in ("image", "label", *extra) if k not in info]
      if missing:
        errors.append(f"config.data.path={d.path!r} has no array(s) {missing}; it has {sorted(info)}.")
      elif info["image"][1] != np.uint8 and tuple(info["image"][0][1:]) != (d.image_size, d.image_size,
                                                                               d.num_channels):
        errors.append(f"config.data.path={d.path!r}: float images of shape {tuple(info['image'][0][1:])} do not "
                      f"match data.image_size={d.image_size}, num_channels={d.num_channels}.")
  return errors


def _finetune_errors(config) -> list[str]:
  """Consistency of the objective, the finetuning fields and the data."""
  f, errors = config.finetune, []
  if f.lora_rank and not f.lora_targets:
    errors.append(f"config.finetune.lora_rank={f.lora_rank} but config.finetune.lora_targets is empty; name the "
                  "Dense layers to adapt (regexes of module paths such as 'mlp/w12').")
  if (f.trainable or f.lora_rank or f.lr_mults) and not f.base:
    errors.append("config.finetune.trainable / lora_rank / lr_mults need config.finetune.base (the workdir of the "
                  "frozen base weights).")
  if f.base and not (f.trainable or f.lora_rank):
    errors.append(f"config.finetune.base={f.base!r} is set but nothing is trainable: set config.finetune.trainable "
                  "and/or config.finetune.lora_rank.")
  if config.objective == "asymflow_vr":
    if not f.base:
      errors.append("config.objective='asymflow_vr' needs config.finetune.base: the lifted model is the frozen teacher.")
    if config.vr.latent_key not in tuple(config.data.get("extra_keys", ())):
      errors.append(f"config.objective='asymflow_vr' reads the latents from batch key {config.vr.latent_key!r}; "
                    f"add it to config.data.extra_keys (now {tuple(config.data.get('extra_keys', ()))}).")
  if config.ema_policy == "karras" and len(tuple(config.ema_decays)) != 1:
    errors.append(f"config.ema_policy='karras' keeps one EMA tree; set config.ema_decays to one value "
                  f"(it is unused), got {tuple(config.ema_decays)}.")
  if config.model.color_space == "oklab" and config.model.in_channels != 3:
    errors.append(f"config.model.color_space='oklab' needs 3 channels, got model.in_channels={config.model.in_channels}.")
  return errors


def _repa_errors(config, training: bool, check_files: bool) -> list[str]:
  """REPA: an AsymJiT flow run from scratch, a block that exists, a known encoder and its weights."""
  r, m = config.repa, config.model
  if not r.weight:
    return []
  errors = []
  if not (_number(r.weight) and r.weight > 0):
    return [f"config.repa.weight={r.weight!r}: expected a number >= 0 (0 = no REPA)."]
  if m.family != "jit" or config.objective != "flow" or config.finetune.base:
    errors.append(f"config.repa.weight={r.weight}: REPA is implemented for AsymJiT trained from scratch with "
                  f"objective 'flow' (got model.family={m.family!r}, objective={config.objective!r}, "
                  f"finetune.base={config.finetune.base!r}).")
  elif not (isinstance(r.block, int) and 0 <= r.block < m.depth):
    errors.append(f"config.repa.block={r.block!r}: expected a block index in [0, model.depth={m.depth}).")
  if r.encoder not in repa.ENCODERS:
    errors.append(f"config.repa.encoder={r.encoder!r}: expected one of {repa.ENCODERS}.")
  if r.encoder_dtype not in backbone.DTYPES:
    errors.append(f"config.repa.encoder_dtype={r.encoder_dtype!r}: expected one of {sorted(backbone.DTYPES)}.")
  if r.encoder == "vgg16" and not (isinstance(r.vgg_tap, int) and 0 <= r.vgg_tap <= 4):
    errors.append(f"config.repa.vgg_tap={r.vgg_tap!r}: expected 0..4 (relu1_2 .. relu5_3).")
  if not (isinstance(r.projector_dim, int) and r.projector_dim >= 1):
    errors.append(f"config.repa.projector_dim={r.projector_dim!r}: expected an integer >= 1.")
  if training and r.encoder.startswith("dinov2"):
    if not r.encoder_path:
      errors.append(f"config.repa.encoder={r.encoder!r} needs config.repa.encoder_path: a transformers DINOv2 "
                    "folder (config.json + model.safetensors), e.g. a local copy of facebook/dinov2-base.")
    elif check_files and not epath.Path(r.encoder_path, "config.json").exists():
      errors.append(f"config.repa.encoder_path={r.encoder_path!r} has no config.json (a transformers DINOv2 "
                    "checkpoint folder was expected).")
  return errors


# ---------------------------------------------------------------------------- resume compatibility

# Fields that do not change the shapes or structure of the checkpointed state.
_NON_STRUCTURAL_MODEL = ("size", "dtype", "remat", "remat_policy", "attn_dropout", "proj_dropout", "color_space",
                         "attention_impl", "scan_layers")
# Finetuning fields that decide which leaves the checkpoint holds.
_STRUCTURAL_FINETUNE = ("base", "trainable", "lora_rank", "lora_targets")


def _structural_model(m) -> dict:
  """The model section with the family defaulted (older workdirs have none) and the other family's fields dropped."""
  m = dict(m)
  m.setdefault("family", "jit")
  if m["family"] == "jit":
    m.pop("flux2", None)
    m.pop("text_length", None)
  else:
    for f in ("hidden_size", "depth", "num_heads", "bottleneck_dim", "mlp_ratio", "in_context_len",
              "in_context_start", "num_classes", "projected_init"):
      m.pop(f, None)
  if isinstance(m.get("flux2"), dict):
    m["flux2"] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m["flux2"].items()}
  return m


def structural_diff(stored, new) -> list[str]:
  """``field: stored -> new`` for each difference that changes the checkpointed state's structure
  (model architecture and rank, number of EMA trees, gradient clipping on/off)."""
  out = []
  sm, nm = (_structural_model(c.get("model", {})) for c in (stored, new))
  for key in sorted(set(sm) | set(nm)):
    if key not in _NON_STRUCTURAL_MODEL and sm.get(key) != nm.get(key):
      out.append(f"model.{key}: {sm.get(key)!r} -> {nm.get(key)!r}")
  if len(stored.get("ema_decays", ())) != len(new.get("ema_decays", ())):
    out.append(f"ema_decays: {tuple(stored.get('ema_decays', ()))} -> {tuple(new.get('ema_decays', ()))} "
               "(a different number of EMA trees)")
  sf, nf = stored.get("finetune", {}), new.get("finetune", {})
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  defaults = dict(base="", trainable=(), lora_rank=0, lora_targets=())
  for key in _STRUCTURAL_FINETUNE:
    a, b = norm(sf.get(key, defaults[key])), norm(nf.get(key, defaults[key]))
    if a != b:
      out.append(f"finetune.{key}: {a!r} -> {b!r}")
  sr, nr = ({"weight": 0.0, **c.get("repa", {})} for c in (stored, new))
  repa_shape = lambda r: (r["weight"] > 0, r.get("projector_dim"), r.get("encoder"), r.get("vgg_tap")) if r["weight"] > 0 \
      else (False,)
  if repa_shape(sr) != repa_shape(nr):
    out.append(f"repa: (on, projector_dim, encoder, vgg_tap) {repa_shape(sr)} -> {repa_shape(nr)} (the trained projector)")
  if (stored.get("grad_clip", 0) > 0) != (new.get("grad_clip", 0) > 0):
    out.append(f"grad_clip: {stored.get('grad_clip')!r} -> {new.get('grad_clip')!r} (optimizer state structure)")
  return out
