"""An experiment built from its config: model, optimizer, subspace, and the train or inference state
with its shardings on a mesh.

    exp = experiment.build(config, mesh, training=True)    # or training=False to sample/evaluate
    state = exp.init_state(experiment.make_subspace(config))

``exp.abstract`` holds shapes and dtypes only (nothing is allocated) and ``exp.shardings`` the
NamedSharding of every leaf: parameters by the logical-axis rules, optimizer state derived from
its parameters, scalars replicated. Checkpoint restore (``asymflow_jax.checkpoint``) and the
compiled steps use both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax
import ml_collections
import optax

from asymflow_jax import config as config_lib
from asymflow_jax import dinov2_import
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.evaluation import lpips
from asymflow_jax.models import backbone, finetune, repa

DTYPES = backbone.DTYPES

# Bits of TrainState.nonfinite_kind: what was not finite in the skipped update.
NONFINITE_LOSS, NONFINITE_GRAD, NONFINITE_UPDATE = 1, 2, 4


@flax.struct.dataclass
class TrainState:
  """Everything a training checkpoint holds besides the data-iterator state.

  ``ema`` is a tuple of parameter trees, one per decay in ``config.ema_decays``. ``basis`` (D, r)
  and ``scale`` are the subspace (not trained). ``nonfinite_step`` is -1, or the first step whose
  update was skipped because something was not finite; ``nonfinite_kind`` says what (bits
  NONFINITE_LOSS | NONFINITE_GRAD | NONFINITE_UPDATE).

  Finetuning (``config.finetune.base`` set): ``params``, ``opt_state`` and ``ema`` cover only the
  trained leaves (the trainable subset plus the LoRA adapters under "lora"), and ``frozen`` holds
  the networks the step reads but never changes: ``frozen["params"]``, the full base tree (also the
  AsymFlowVR teacher, so frozen weights exist once on device), and ``frozen["lpips"]`` when the
  LPIPS term is on. ``frozen`` is not checkpointed; it is reloaded from the base workdir.

  REPA (``config.repa.weight`` > 0): ``params[REPA_PROJECTOR]`` is the trained projector (in the
  optimizer and EMA like every parameter; sampling drops it) and ``frozen["repa_encoder"]`` the
  frozen encoder's weights, reloaded from ``config.repa`` on every start.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema: tuple
  rng: jax.Array
  basis: jax.Array
  scale: jax.Array
  nonfinite_step: jax.Array
  nonfinite_kind: jax.Array
  frozen: Any = None


@flax.struct.dataclass
class InferenceState:
  """What sampling and evaluation need: one parameter tree (raw or an EMA), the subspace, the step."""

  step: jax.Array
  params: Any
  basis: jax.Array
  scale: jax.Array


def describe_nonfinite(kind: int) -> str:
  """'loss', 'gradient', 'update' (or several, joined) from a ``nonfinite_kind`` bit set."""
  names = [n for bit, n in ((NONFINITE_LOSS, "loss"), (NONFINITE_GRAD, "gradient"), (NONFINITE_UPDATE, "update"))
           if int(kind) & bit]
  return " and ".join(names) or "value"


# ------------------------------------------------------------------------------ model & optimizer


def model_from_config(config):
  """The backbone of ``config.model`` (``family``: AsymJiT or AsymFLUX.2, see models/backbone.py)."""
  return backbone.from_config(config.model)


def lr_schedule(config) -> optax.Schedule:
  """Constant lr after an mmcv linear warm-up: lr_i = lr (1 - (1 - i/W)(1 - ratio)) for i < W."""
  def schedule(step):
    if config.warmup_steps == 0:
      return jnp.full(jnp.shape(step), config.lr, jnp.float32)
    frac = jnp.minimum(step / config.warmup_steps, 1.0)
    return config.lr * (frac + (1 - frac) * config.warmup_ratio)  # the same, without cancellation
  return schedule


class ClipFromStepState(NamedTuple):
  count: jax.Array


def clip_by_global_norm_from(max_norm: float, start: int) -> optax.GradientTransformation:
  """Global-norm clipping that starts at update ``start`` (updates before it pass unchanged)."""
  def init(params):
    del params
    return ClipFromStepState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.where((state.count >= start) & (norm > max_norm), max_norm / norm, 1.0)
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), ClipFromStepState(state.count + 1)
  return optax.GradientTransformation(init, update)


def scale_by_path_multiplier(lr_mults) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first (regex, mult) pair matching its path
  (an lr multiplier for AdamW's whole step, weight decay included); stateless."""
  labels = tuple((p, float(m)) for p, m in lr_mults)

  def update(updates, state, params=None):
    del params
    mults = finetune.lr_labels(updates, labels)
    return jax.tree.map(lambda u, m: u * float(m[1:]), updates, mults), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (spec section 4) with the warm-up schedule, after optional global-norm clipping
  (from ``grad_clip_start``), then per-path lr multipliers (``finetune.lr_mults``)."""
  parts = []
  if config.grad_clip > 0:
    parts.append(clip_by_global_norm_from(config.grad_clip, config.grad_clip_start) if config.grad_clip_start
                 else optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  if config.finetune.lr_mults:
    parts.append(scale_by_path_multiplier(config.finetune.lr_mults))
  return optax.chain(*parts)


def ema_momenta(config, step) -> tuple:
  """The EMA momentum of each tree at the update of ``step`` (0-based): ema <- p + (ema - p) m.

  "fixed": m = decay. "karras" (the lift recipe): m = (1 - 1/t)^(gamma + 1) with
  t = max(step + 1 - ema_start, 1), so the EMA copies the weights until ``ema_start``.
  """
  if config.ema_policy == "karras":
    t = jnp.maximum(step + 1 - config.ema_start, 1).astype(jnp.float32)
    return (jnp.power(1.0 - 1.0 / t, config.ema_gamma + 1.0),)
  return tuple(config.ema_decays)


# ------------------------------------------------------------------------------------ finetuning


def finetuning(config) -> bool:
  """True when the run trains a subset of a frozen base (``config.finetune.base`` set)."""
  return bool(config.finetune.base)


def lora_scale(config) -> float:
  f = config.finetune
  return (f.lora_alpha or f.lora_rank) / max(f.lora_rank, 1)


def init_trained(config, base, key) -> dict:
  """The trained tree of a finetuning run: the trainable subset of ``base`` plus fresh LoRA adapters."""
  f = config.finetune
  trained = finetune.select(base, f.trainable)
  if f.lora_rank:
    trained[finetune.LORA] = finetune.init_lora(jax.random.fold_in(key, 2), base, f.lora_targets, f.lora_rank)
  return trained


def inference_params(config, trained, frozen=None):
  """A plain parameter tree for sampling: ``trained`` itself (without a REPA projector), or
  (finetuning) the frozen base with the trained leaves and the LoRA adapters folded in."""
  if not finetuning(config):
    return model_params(trained)
  return finetune.merge(frozen["params"], trained, lora_scale(config))


def has_frozen(config) -> bool:
  """True when the train state carries frozen networks (finetuning base, LPIPS, REPA encoder)."""
  return finetuning(config) or repa_enabled(config)


def frozen_networks(config, base_params=None, *, load: bool = True) -> dict:
  """What a step reads but never trains: the finetuning base tree (and LPIPS weights if used), the
  REPA encoder's weights. ``load=False``: the REPA encoder as ShapeDtypeStructs (abstract states)."""
  frozen = {}
  if finetuning(config):
    frozen["params"] = base_params
    if config.objective == "asymflow_vr" and config.vr.lpips_weight > 0:
      frozen["lpips"] = lpips.load_lpips_params(config.vr.lpips_net)
  if repa_enabled(config):
    frozen[REPA_ENCODER] = load_repa_encoder(config) if load else repa_encoder(config).abstract_params()
  return frozen


# ------------------------------------------------------------------------------------------ REPA

REPA_PROJECTOR = "repa_projector"   # key of the trained projector in TrainState.params
REPA_ENCODER = "repa_encoder"       # key of the frozen encoder's weights in TrainState.frozen


def repa_enabled(config) -> bool:
  return bool(config.get("repa", {}).get("weight", 0.0))


def repa_encoder(config) -> repa.Encoder:
  """The frozen REPA encoder of ``config.repa`` on the model's token grid."""
  r, m = config.repa, config.model
  return repa.Encoder(r.encoder, grid=m.input_size // m.patch_size, dtype=DTYPES[r.encoder_dtype], vgg_tap=r.vgg_tap)


def repa_projector(config) -> repa.Projector:
  return repa.Projector(config.repa.projector_dim, repa_encoder(config).dim)


def load_repa_encoder(config, shardings=None):
  """The REPA encoder's weights in ``config.repa.encoder_dtype``: a transformers DINOv2 folder
  (``repa.encoder_path``; its config.json must be the named size) or the LPIPS package's VGG16."""
  enc = repa_encoder(config)
  if enc.kind == "vgg16":
    params = repa.vgg16_params(lpips.load_lpips_params("vgg"), enc.vgg_tap, enc.dtype)
    return params if shardings is None else jax.device_put(params, shardings)
  return dinov2_import.load_hf_dinov2(config.repa.encoder_path, enc.dinov2_config, shardings=shardings,
                                      dtype=enc.dtype)


def model_params(params):
  """The backbone's parameters of a trained tree (the REPA projector, if any, dropped)."""
  return {k: v for k, v in params.items() if k != REPA_PROJECTOR} if REPA_PROJECTOR in params else params


def _init_projector(config, model, key):
  """Fresh REPA projector parameters (its input width is the backbone's hidden size)."""
  h = jnp.zeros((1, 1, model.config.hidden_size), jnp.float32)
  return repa_projector(config).init(key, h)["params"]


def init_params(config, model, key, basis=None):
  """Fresh trained parameters: the backbone's (``basis``: projected init), plus the REPA projector."""
  params = backbone.init_params(model, key, basis)
  if repa_enabled(config):
    params = {**params, REPA_PROJECTOR: _init_projector(config, model, jax.random.fold_in(key, 3))}
  return params


# ------------------------------------------------------------------------------------- subspace


def make_subspace(config) -> subspace_lib.Subspace:
  """The run's subspace, made once at the start of training (it then lives in the checkpoint):
  ``kind=file`` loads ``subspace.path``; ``pca`` runs PCA over ``subspace.num_images`` training
  images; ``random`` draws a Haar-random basis. Rows are in the model's DiT (py, px, c) packing."""
  m, s = config.model, config.subspace
  d = m.patch_size ** 2 * m.in_channels
  if s.kind == "file":
    sub = subspace_lib.Subspace.load(s.path)
  elif s.kind == "random":
    sub = subspace_lib.random_subspace(d, m.rank, seed=s.seed, patch_size=m.patch_size)
  else:
    sub = _pca_from_data(config)
  if sub.packing != "dit":
    sub = sub.with_packing("dit")
  if sub.dim != d or sub.rank != m.rank:
    raise ValueError(f"subspace has D={sub.dim}, r={sub.rank}; the model needs D={d}, r={m.rank}.")
  return sub


def _pca_from_data(config) -> subspace_lib.Subspace:
  """PCA on ``subspace.num_images`` training images (one pass over a seeded pipeline)."""
  m, s = config.model, config.subspace
  batch = 100
  pipe = data_pipeline.make_pipeline(config.data, seed=s.seed, global_batch_size=batch, process_index=0,
                                     process_count=1, num_epochs=1)
  num = min(s.num_images, pipe.steps_per_epoch * batch)
  it = iter(pipe)
  batches = (next(it)["image"] for _ in range(max(num // batch, 1)))
  return subspace_lib.pca_subspace(batches, m.patch_size, m.rank, progress=jax.process_index() == 0,
                                   provenance=dict(data=config.data.source, num_images=num, seed=s.seed))


# ----------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A config made concrete on a mesh. ``optimizer`` is None for inference experiments."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: Any   # the backbone module (models/backbone.py)
  optimizer: optax.GradientTransformation | None
  abstract: TrainState | InferenceState
  shardings: TrainState | InferenceState

  @property
  def training(self) -> bool:
    return self.optimizer is not None

  def target(self):
    """The abstract state with its shardings (ShapeDtypeStructs): a restore target or lowering input."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings)

  def init_state(self, sub: subspace_lib.Subspace, params=None, frozen=None) -> TrainState:
    """A fresh TrainState directly in its shardings (no host copy of the full model).

    ``params`` (optional, e.g. a converted checkpoint to train further) replaces the
    initialisation; the EMA trees start from the parameters. A finetuning run instead passes
    ``frozen`` (see :func:`frozen_networks`): the trained tree starts from its base.
    """
    if not self.training:
      raise ValueError("init_state needs a training experiment (build(..., training=True)).")
    config, model, optimizer = self.config, self.model, self.optimizer
    if has_frozen(config) != (frozen is not None):
      raise ValueError("a finetuning or REPA config needs frozen=frozen_networks(...), and only it.")
    projected = sub.rank > 0 and config.model.projected_init and not backbone.is_text(model)

    def init(key, basis, given, base):
      if base is not None:
        p = init_trained(config, base, key)
      else:
        p = given if given is not None else init_params(config, model, key, basis if projected else None)
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                        ema=tuple(p for _ in config.ema_decays), rng=jax.random.fold_in(key, 1),
                        basis=basis, scale=jnp.asarray(sub.scale, jnp.float32),
                        nonfinite_step=jnp.full((), -1, jnp.int32), nonfinite_kind=jnp.zeros((), jnp.int32))
    out_sh = self.shardings.replace(frozen=None)
    state = jax.jit(init, out_shardings=out_sh)(jax.random.key(config.seed), jnp.asarray(sub.basis), params,
                                                frozen.get("params") if frozen else None)
    if frozen is None:
      return state
    # The frozen networks are not copied: already in place, device_put is a no-op.
    return state.replace(frozen=jax.device_put(frozen, self.shardings.frozen))


def _abstract_train_state(model, optimizer, config) -> TrainState:
  d = backbone.patch_dim(model)
  def init():
    params = init_params(config, model, jax.random.key(0))
    frozen = None
    if finetuning(config):
      frozen = dict(params=params)
      params = init_trained(config, params, jax.random.key(0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=tuple(params for _ in config.ema_decays), rng=jax.random.key(0),
                      basis=jnp.zeros((d, config.model.rank)), scale=jnp.zeros(()),
                      nonfinite_step=jnp.zeros((), jnp.int32), nonfinite_kind=jnp.zeros((), jnp.int32),
                      frozen=frozen)
  abstract = jax.eval_shape(init)
  if not has_frozen(config):
    return abstract
  extra = {k: v for k, v in frozen_networks(config, load=False).items() if k != "params"}
  extra = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), extra)
  return abstract.replace(frozen={**(abstract.frozen or {}), **extra})


def _trained_shardings(config, trained, full_param_sh):
  """The trainable subset is sharded like the full tree. A LoRA pair of a kernel (..., in, out)
  splits its non-rank axis over the kernel's mesh axes for it plus "fsdp": A (..., in, r) as
  (..., in_axes + fsdp, None), B (..., r, out) as (..., None, out_axes + fsdp), so the adapters (rank
  256 on a 9B model: ~300M parameters, x4 with Adam and EMA) are never replicated over FSDP and
  A x B needs no gather of the rank axis. Axes that do not divide a dimension are dropped."""
  sh = finetune.select(full_param_sh, config.finetune.trainable)
  if finetune.LORA in trained:
    def adapter(path, leaf):
      names = finetune.path_str(path).split("/")
      kernel = finetune._get(full_param_sh, names[:-1] + ["kernel"])   # pylint: disable=protected-access
      spec = tuple(kernel.spec) + (None,) * (leaf.ndim - len(kernel.spec))
      dim = leaf.ndim - 2 if names[-1] == "a" else leaf.ndim - 1        # the non-rank axis
      axes = spec[dim] if isinstance(spec[dim], tuple) else tuple(a for a in (spec[dim],) if a)
      axes = tuple(dict.fromkeys(("fsdp",) + axes))
      spec = tuple(axes if i == dim else (s if i < leaf.ndim - 2 else None) for i, s in enumerate(spec))
      return jax.sharding.NamedSharding(kernel.mesh, shd.fit_spec(jax.sharding.PartitionSpec(*spec), leaf.shape,
                                                                   kernel.mesh))
    sh[finetune.LORA] = jax.tree_util.tree_map_with_path(adapter, trained[finetune.LORA])
  return sh


def trained_target(exp: "Experiment"):
  """Abstract trained tree (ShapeDtypeStructs with shardings) of a finetuning config: the restore
  target of its ``params`` / ``ema_<i>`` items (training or inference experiment)."""
  config = exp.config
  abstract = jax.eval_shape(lambda: init_trained(config, backbone.init_params(exp.model, jax.random.key(0)),
                                                 jax.random.key(0)))
  full_sh = exp.shardings.frozen["params"] if exp.training else exp.shardings.params
  return _sharded_structs(abstract, _trained_shardings(config, abstract, full_sh))


def _sharded_structs(abstract, shardings):
  """ShapeDtypeStructs of ``abstract`` carrying ``shardings`` (a restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def checkpoint_params_target(exp: "Experiment"):
  """What a checkpoint's ``params`` / ``ema_<i>`` item holds (ShapeDtypeStructs with shardings), for an
  inference experiment: the backbone, plus the REPA projector of a REPA run, or (finetuning) the
  trained tree. :func:`inference_params` turns the restored tree into the sampling parameters."""
  config = exp.config
  if finetuning(config):
    return trained_target(exp)
  target = exp.target().params
  if repa_enabled(config):
    abstract = jax.eval_shape(lambda: _init_projector(config, exp.model, jax.random.key(0)))
    sh = shd.logical_to_sharding(repa.projector_specs(), abstract, exp.mesh)
    target = {**target, REPA_PROJECTOR: _sharded_structs(abstract, sh)}
  return target


def _abstract_inference_state(model, config, params) -> InferenceState:
  d = backbone.patch_dim(model)
  return InferenceState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        basis=jax.ShapeDtypeStruct((d, config.model.rank), jnp.float32),
                        scale=jax.ShapeDtypeStruct((), jnp.float32))


def build(config, mesh, *, training: bool) -> Experiment:
  """Model, optimizer (training only), abstract state and shardings for ``config`` on ``mesh``.

  Validates the config first (no files are checked here; the entry points do that), so every
  error surfaces before anything is compiled.
  """
  config_lib.validate_config(config, mesh.size, jax.process_count(), training=training, check_files=False)
  model = model_from_config(config)
  scanned = backbone.is_text(model) or config.model.get("scan_layers", False)
  splash = config.model.get("attention_impl", "einsum") == "splash"
  if (scanned or splash) and mesh.size > 1:   # batch-split activations in layer scans; splash runs per shard
    model = model.clone(batch_sharding=shd.batch_sharding(mesh, 3))
  abstract_params, specs = backbone.abstract_params_and_specs(model)
  if finetuning(config):
    finetune.check_patterns(abstract_params, config.finetune.trainable, config.finetune.lora_targets)
  repl = shd.replicated(mesh)
  if training:
    optimizer = make_optimizer(config)
    abstract = _abstract_train_state(model, optimizer, config)
    if repa_enabled(config):   # the trained projector (sampling never reads it)
      specs = {**specs, REPA_PROJECTOR: repa.projector_specs()}
    full_abstract = abstract.frozen["params"] if finetuning(config) else abstract.params
    full_sh = shd.logical_to_sharding(specs, full_abstract, mesh)
    param_sh = _trained_shardings(config, abstract.params, full_sh) if finetuning(config) else full_sh
    frozen_sh = None
    if has_frozen(config):
      frozen_sh = {k: jax.tree.map(lambda _: repl, v) for k, v in abstract.frozen.items()}
      if finetuning(config):
        frozen_sh["params"] = full_sh
      if repa_enabled(config):   # DINOv2 by the model's logical axes (FSDP); VGG16 replicated
        frozen_sh[REPA_ENCODER] = shd.logical_to_sharding(repa_encoder(config).param_specs(),
                                                          abstract.frozen[REPA_ENCODER], mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: repl)
    shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh,
                           ema=tuple(param_sh for _ in config.ema_decays), rng=repl, basis=repl, scale=repl,
                           nonfinite_step=repl, nonfinite_kind=repl, frozen=frozen_sh)
  else:
    optimizer = None
    abstract = _abstract_inference_state(model, config, abstract_params)
    param_sh = shd.logical_to_sharding(specs, abstract.params, mesh)
    shardings = InferenceState(step=repl, params=param_sh, basis=repl, scale=repl)
  return Experiment(config=config, mesh=mesh, model=model, optimizer=optimizer, abstract=abstract,
                    shardings=shardings)
