"""AsymFlow training: one jitted, sharded train step and a single readable loop.

    python -m asymflow_jax.train --config=configs/default.py --workdir=workdirs/default \
        [--config.model.rank=8 --config.batch_size=128 ...]

Loop: subspace (computed on first run and cached in the workdir, or loaded) -> sharded TrainState
-> for each step: global batch from the grain pipeline -> ``train_step`` -> metrics, async orbax
checkpoints (params, optimizer, EMA, step, RNG, subspace, data-iterator state), preemption save.

Loss (spec section 4): sigma = shift-warp(sigmoid(m + s n)) clipped to [1e-4, 1]; labels kept with
prob 0.9 else the null class; u = AsymJiT(x_sigma) with the train recovery clamp 1e-6;
L = mean((w (u - (eps - x0)))^2) with w = sigma / max(sigma, 0.05).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any

import ml_collections
import numpy as np

import jax
import jax.numpy as jnp
import flax
import optax
import orbax.checkpoint as ocp

from asymflow_jax import asymflow as af
from asymflow_jax import distributed
from asymflow_jax import sampling
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.models import asymjit, jit as jit_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------------------ state


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data-iterator state.

  ``ema`` is a tuple of parameter trees, one per decay in ``config.ema_decays``. ``basis`` (D, r)
  and ``scale`` are the subspace (not trained). ``nonfinite_step`` is -1, or the first step
  whose loss or gradient was not finite (that update was skipped).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema: tuple
  rng: jax.Array
  basis: jax.Array
  scale: jax.Array
  nonfinite_step: jax.Array


def model_from_config(config) -> jit_lib.JiT:
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}.")
  cfg = jit_lib.JiTConfig(**{f.name: m[f.name] for f in dataclasses.fields(jit_lib.JiTConfig)})
  return jit_lib.JiT(cfg, dtype=DTYPES[m.dtype], remat=m.remat, remat_policy=m.remat_policy)


def lr_schedule(config) -> optax.Schedule:
  """Constant lr after an mmcv linear warm-up: lr_i = lr (1 - (1 - i/W)(1 - ratio)) for i < W."""
  def schedule(step):
    frac = jnp.minimum(step / max(config.warmup_steps, 1), 1.0)
    return config.lr * (frac + (1 - frac) * config.warmup_ratio)  # the same, without cancellation
  return schedule


def make_optimizer(config) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def sample_sigma(key, batch: int, config) -> jax.Array:
  """Logit-normal noise levels with the shift warp and the lower clip (spec section 4)."""
  sigma = jax.nn.sigmoid(config.sigma_mean + config.sigma_std * jax.random.normal(key, (batch,)))
  shift = config.sigma_shift
  sigma = shift * sigma / (1 + (shift - 1) * sigma)
  return jnp.clip(sigma, config.sigma_clip_min, 1.0)


def flow_loss(params, batch, key, basis, scale, *, model, config):
  """Per-sample flow-matching loss on the recovered velocity. Returns (mean loss, aux)."""
  x0, labels = batch["image"], batch["label"]
  b = x0.shape[0]
  k_label, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  keep = jax.random.bernoulli(k_label, config.prob_class, (b,))
  labels = jnp.where(keep, labels, model.config.num_classes)
  sigma = sample_sigma(k_sigma, b, config)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = af.add_noise(x0, noise, sigma)
  u = asymjit.asymjit_apply(model, params, x_t, sigma, labels, basis, scale=scale,
                            sigma_min=af.TRAIN_SIGMA_MIN, train=True, rngs={"dropout": k_drop})
  w = (sigma / jnp.maximum(sigma, config.loss_sigma_min))[:, None, None, None]
  per_sample = jnp.mean(jnp.square(w * (u - (noise - x0))), axis=(1, 2, 3))
  return jnp.mean(per_sample), dict(per_sample=per_sample, sigma=sigma)


def _bucket_means(values, sigma):
  edges = jnp.asarray(SIGMA_BUCKETS)
  idx = jnp.clip(jnp.searchsorted(edges, sigma, side="right") - 1, 0, len(SIGMA_BUCKETS) - 2)
  onehot = jax.nn.one_hot(idx, len(SIGMA_BUCKETS) - 1)
  counts = onehot.sum(0)
  return (onehot * values[:, None]).sum(0) / jnp.maximum(counts, 1), counts


def train_step(state: TrainState, batch, *, model, config, optimizer):
  """One optimisation step. Non-finite loss/grads skip the update and record the step."""
  key, new_rng = jax.random.split(state.rng)
  key = jax.random.fold_in(key, state.step)
  grad_fn = jax.value_and_grad(flow_loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, batch, key, state.basis, state.scale, model=model, config=config)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  params = optax.apply_updates(state.params, updates)
  ema = tuple(jax.tree.map(lambda e, p, d=d: p + (e - p) * d, e_tree, params)
              for d, e_tree in zip(config.ema_decays, state.ema))
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep_old(params, state.params), opt_state=keep_old(opt_state, state.opt_state),
      ema=keep_old(ema, state.ema), rng=new_rng,
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step))
  bucket_loss, bucket_count = _bucket_means(aux["per_sample"], aux["sigma"])
  metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr_schedule(config)(state.step),
                 loss_by_sigma=bucket_loss, count_by_sigma=bucket_count)
  return new_state, metrics


# ----------------------------------------------------------------------------------- validation


def validate_config(config, num_devices: int):
  """Fails fast, before any compile, with a message naming the bad value."""
  m = config.model
  if m.input_size % m.patch_size:
    raise ValueError(f"config.model.input_size={m.input_size} is not divisible by patch_size={m.patch_size}.")
  if m.input_size != config.data.image_size or m.in_channels != config.data.num_channels:
    raise ValueError(f"model input {m.input_size}x{m.input_size}x{m.in_channels} does not match the data "
                     f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels}.")
  d = m.patch_size ** 2 * m.in_channels
  if not 0 <= m.rank <= d:
    raise ValueError(f"config.model.rank={m.rank} is outside [0, D={d}] (D = patch_size^2 * in_channels).")
  if m.projected_init and m.rank > m.bottleneck_dim:
    raise ValueError(f"config.model.rank={m.rank} exceeds bottleneck_dim={m.bottleneck_dim}: the projected init "
                     "writes the basis into the first r bottleneck channels. Set config.model.projected_init=False "
                     "(e.g. for r = D, plain velocity prediction) or lower the rank.")
  if config.subspace.kind not in ("pca", "random", "file"):
    raise ValueError(f"config.subspace.kind must be pca, random or file, got {config.subspace.kind!r}.")
  sizes = shd.mesh_shape(config.mesh, num_devices)
  divisor = sizes[0] * sizes[1]
  if config.batch_size % divisor:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by data x fsdp = {divisor} "
                     f"(mesh {dict(zip(shd.MESH_AXES, sizes))}).")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  if config.eval.every and config.eval.metric == "fid" and not (config.eval.inception and config.eval.reference):
    raise ValueError("config.eval.every is set with metric 'fid' but config.eval.inception / config.eval.reference "
                     "are empty; give both .npz paths (docs/evaluation.md) or use metric 'fdd' for digits.")
  if not config.ema_decays or any(not 0 <= e < 1 for e in config.ema_decays):
    raise ValueError(f"config.ema_decays must be a non-empty tuple of values in [0, 1), got {config.ema_decays}.")


# -------------------------------------------------------------------------------------- subspace


def subspace_cache_path(config, workdir: str) -> str:
  m = config.model
  return os.path.join(workdir, f"subspace_{config.subspace.kind}_p{m.patch_size}_r{m.rank}.npz")


def load_or_make_subspace(config, workdir: str | None) -> subspace_lib.Subspace:
  """kind=file loads ``subspace.path``; pca/random are computed once and cached in the workdir."""
  m, s = config.model, config.subspace
  d = m.patch_size ** 2 * m.in_channels
  if s.kind == "file":
    sub = subspace_lib.Subspace.load(s.path)
  else:
    cache = subspace_cache_path(config, workdir) if workdir else None
    if cache and os.path.exists(cache):
      sub = subspace_lib.Subspace.load(cache)
    else:
      if s.kind == "random":
        sub = subspace_lib.random_subspace(d, m.rank, seed=s.seed, patch_size=m.patch_size)
      else:
        sub = _pca_from_data(config)
      if cache and jax.process_index() == 0:
        sub.save(cache)
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
  return subspace_lib.pca_subspace(batches, m.patch_size, m.rank, progress=True,
                                   provenance=dict(data=config.data.source, num_images=num, seed=s.seed))


# ------------------------------------------------------------------------------- state & sharding


def abstract_state(model, optimizer, config) -> TrainState:
  """Shapes and dtypes of the TrainState (no allocation)."""
  d = model.config.patch_dim
  def init():
    params = asymjit.init_params(model, jax.random.key(0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=tuple(params for _ in config.ema_decays), rng=jax.random.key(0),
                      basis=jnp.zeros((d, config.model.rank)), scale=jnp.zeros(()),
                      nonfinite_step=jnp.full((), -1, jnp.int32))
  return jax.eval_shape(init)


def state_shardings(model, optimizer, config, mesh, abstract: TrainState) -> TrainState:
  """Parameter shardings from the logical rules; optimizer-state shardings derived from them."""
  param_sh = shd.logical_to_sharding(jit_lib.param_specs(model), abstract.params, mesh)
  repl = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=param_sh, opt_state=opt_sh, ema=tuple(param_sh for _ in config.ema_decays),
                    rng=repl, basis=repl, scale=repl, nonfinite_step=repl)


def create_state(model, optimizer, config, sub, shardings) -> TrainState:
  """Initialises the state directly into its shardings (no host copy of the full model)."""
  def init(key, basis):
    params = asymjit.init_params(model, key, basis if sub.rank > 0 and config.model.projected_init else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=tuple(params for _ in config.ema_decays), rng=jax.random.fold_in(key, 1),
                      basis=basis, scale=jnp.asarray(sub.scale, jnp.float32),
                      nonfinite_step=jnp.full((), -1, jnp.int32))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed), jnp.asarray(sub.basis))


def compile_train_step(model, optimizer, config, mesh, shardings):
  batch_sh = dict(image=shd.batch_sharding(mesh, 4), label=shd.batch_sharding(mesh, 1))
  step = functools.partial(train_step, model=model, config=config, optimizer=optimizer)
  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, shd.replicated(mesh)),
                 donate_argnums=(0,))


def lower_train_step(config, mesh=None):
  """Lowers (no compile, no run) the sharded train step with abstract inputs: a cheap check that a
  large config (e.g. H/16 on a pod mesh) is consistent, before any device memory is used."""
  validate_config(config, jax.device_count() if mesh is None else mesh.size)
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  model, optimizer = model_from_config(config), make_optimizer(config)
  abstract = abstract_state(model, optimizer, config)
  shardings = state_shardings(model, optimizer, config, mesh, abstract)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  m, b = config.model, config.batch_size
  batch = dict(image=jax.ShapeDtypeStruct((b, m.input_size, m.input_size, m.in_channels), jnp.float32,
                                          sharding=shd.batch_sharding(mesh, 4)),
               label=jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shd.batch_sharding(mesh, 1)))
  return compile_train_step(model, optimizer, config, mesh, shardings).lower(state, batch), shardings


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep, keep_period=c.keep_every or None, save_interval_steps=c.every,
      enable_async_checkpointing=c.async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _without_empty_basis(state: TrainState) -> TrainState:
  """Orbax cannot store zero-size arrays: a rank-0 basis (D, 0) is left out and rebuilt on restore."""
  return state.replace(basis=None) if state.basis.shape[-1] == 0 else state


def save_checkpoint(mngr, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
  step = int(state.step)
  if int(state.nonfinite_step) >= 0:
    raise FloatingPointError(f"non-finite loss or gradient at step {int(state.nonfinite_step)}; "
                             "not writing a checkpoint from this state.")
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_without_empty_basis(state)),
                                                 data=ocp.args.JsonSave(data_state)), force=force)


def restore_checkpoint(mngr, abstract: TrainState, shardings: TrainState, step: int | None = None):
  """Restores (state, data_state) from ``step`` (default latest) into the given shardings."""
  step = mngr.latest_step() if step is None else step
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_without_empty_basis(target)),
                                                    data=ocp.args.JsonRestore()))
  state = out.state
  if state.basis is None:
    state = state.replace(basis=jax.device_put(jnp.zeros(abstract.basis.shape, abstract.basis.dtype), shardings.basis))
  return state, out.data


# ------------------------------------------------------------------------------------------ loop


def generate_samples(state: TrainState, model, config, mesh, num: int, seed: int) -> np.ndarray:
  """uint8 EMA samples (class-balanced; sampler and CFG from ``config.sample``), on every process."""
  c = config.sample
  return sampling.generate_on_mesh(model, state.ema[0], state.basis, state.scale, mesh, 0, num, seed=seed,
                                   guidance=c.guidance, interval=tuple(c.interval), num_steps=c.num_steps,
                                   method=c.method)


def write_samples(state: TrainState, model, config, mesh, path: str) -> np.ndarray:
  """A PNG grid of ``config.sample.num_images`` samples (one class per column); returns them."""
  images = generate_samples(state, model, config, mesh, config.sample.num_images, config.seed + 1)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n, classes = images.shape[0], model.config.num_classes
    sampling.save_png(path, images, cols=classes if n % classes == 0 else None,
                      upscale=max(1, 128 // model.config.input_size))
  return images


def evaluate_samples(state: TrainState, model, config, mesh, workdir: str) -> dict:
  """``config.eval.metric`` (fdd | fid) of ``config.eval.num_images`` samples; {} off process 0."""
  from asymflow_jax import evaluate  # pylint: disable=import-outside-toplevel
  e = config.eval
  images = generate_samples(state, model, config, mesh, e.num_images, config.seed + 2)
  if jax.process_index() != 0:
    return {}
  result = evaluate.score_images(images, e.metric, inception=e.inception or None, reference=e.reference or None,
                                 classifier_cache=os.path.join(workdir, "digit_classifier.msgpack"))
  return {f"eval_{k}": float(v) for k, v in result.items() if k not in ("metric", "num_images")}


class _Preemption:
  """Sets a flag on SIGTERM so a single-process loop can save and exit cleanly.

  Multi-process runs rely on JAX's own preemption sync (``CheckpointManager.reached_preemption``),
  which makes every process stop at the same step; a Python handler would replace it and let one
  process exit while the others block in a collective.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() > 1:
      return
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      pass

  def _handle(self, *_):
    self.requested = True


def _data_state(iterator) -> dict:
  return dict(iterator=json.dumps(iterator.get_state()) if hasattr(iterator, "get_state") else "")


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> TrainState:
  """Runs (or resumes) training; returns the final state."""
  validate_config(config, jax.device_count())
  distributed.check_config_agreement(config, dict(workdir=workdir))
  mesh = shd.make_mesh(config.mesh)
  model = model_from_config(config)
  optimizer = make_optimizer(config)
  os.makedirs(workdir, exist_ok=True)
  sub = load_or_make_subspace(config, workdir)
  abstract = abstract_state(model, optimizer, config)
  shardings = state_shardings(model, optimizer, config, mesh, abstract)
  pipe = data_pipeline.make_pipeline(config.data, seed=config.seed, global_batch_size=config.batch_size)
  iterator = iter(pipe)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state, data_state = restore_checkpoint(mngr, abstract, shardings)
    if data_state.get("iterator"):
      iterator.set_state(json.loads(data_state["iterator"]))
    _log(f"resumed from step {int(state.step)}")
  else:
    state = create_state(model, optimizer, config, sub, shardings)
  step_fn = compile_train_step(model, optimizer, config, mesh, shardings)
  preempt = _Preemption()
  writer = MetricWriter(workdir)

  start = int(state.step)
  bar = _progress(start, config.num_steps, progress)
  t0, n_images = time.time(), 0
  for step in range(start, config.num_steps):
    batch = shd.global_batch(next(iterator), mesh)
    state, metrics = step_fn(state, batch)
    n_images += config.batch_size
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      metrics = jax.device_get(metrics)
      if int(state.nonfinite_step) >= 0:
        raise FloatingPointError(f"non-finite loss or gradient at step {int(state.nonfinite_step)} "
                                 f"(loss {metrics['loss']}); the update was skipped and nothing was saved.")
      dt = time.time() - t0
      scalars = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), lr=float(metrics["lr"]),
                     img_per_s=n_images / max(dt, 1e-9))
      for i, (lo, hi) in enumerate(zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:])):
        if metrics["count_by_sigma"][i] > 0:
          scalars[f"loss_sigma_{lo:.2f}_{hi:.2f}"] = float(metrics["loss_by_sigma"][i])
      writer.write(done, scalars)
      if bar is not None:
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['img_per_s']:.1f}")
      t0, n_images = time.time(), 0
    if bar is not None:
      bar.update(1)
    if preempt.requested or mngr.reached_preemption(done):
      save_checkpoint(mngr, state, _data_state(iterator), force=True)
      mngr.wait_until_finished()
      _log(f"preempted: saved step {done} and exiting")
      sys.exit(0)
    if done % config.checkpoint.every == 0 or done == config.num_steps:
      save_checkpoint(mngr, state, _data_state(iterator), force=done == config.num_steps)
    if config.eval.every and done % config.eval.every == 0:
      writer.write(done, evaluate_samples(state, model, config, mesh, workdir))
    if (config.sample.every and done % config.sample.every == 0) or done == config.num_steps:
      path = os.path.join(workdir, "samples", f"step_{done:07d}.png")
      write_samples(state, model, config, mesh, path)
      _log(f"wrote {path}")
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  if bar is not None:
    bar.close()
  return state


# ---------------------------------------------------------------------------------------- logging


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _progress(start, total, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


class MetricWriter:
  """Scalars to ``metrics.jsonl`` (always) and TensorBoard (if tensorboardX is installed), process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.enabled else None
    self._tb = None
    if self.enabled:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, scalars: dict):
    if not self.enabled or not scalars:
      return
    self._file.write(json.dumps(dict(step=step, **scalars)) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self._file:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


# -------------------------------------------------------------------------------------------- CLI


def main(argv):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  del argv
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize_from_flags()  # before any other JAX call; no-op for a single process
  train(flags.FLAGS.config, flags.FLAGS.workdir)


def _cli():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()
  sys.path.insert(0, os.getcwd())  # configs/ imports `configs.common`
  app.run(main)


if __name__ == "__main__":
  _cli()
