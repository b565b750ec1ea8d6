"""The training objectives and the sharded train step.

``flow`` (spec section 4): sigma = shift-warp(sigmoid(m + s n)) clipped to [sigma_clip_min, 1];
labels kept with probability ``prob_class`` else the null class; u = AsymJiT(x_sigma) with the
train recovery clamp 1e-6; L = mean((w (u - (eps - x0)))^2) with w = sigma / max(sigma, loss_sigma_min).

``asymflow_vr`` (spec section 8, latent-lift finetuning): one noise draw for the data x0 and its
low-rank version x0^lr = s U z (z: cached latents); the frozen lifted teacher (eval mode, clamp
``vr.teacher_sigma_min``, no guidance) denoises x_sigma^lr; the student's x0_hat regresses onto
x0 - (1 - rho) c d_lr with the per-patch coefficient c (``asymflow.vr_coefficient``), weighted by
1 / max(sigma, loss_sigma_min)^2, plus LPIPS on the decoded RGB images weighted per pixel by
gate * rho / sigma_c^2. sigma is not clipped here (the reference does not).

A finetuning run (``finetune.base``) differentiates only the trained tree (trainable subset + LoRA);
the student is ``overlay(frozen base, trained)`` with the adapters applied by interception.

PRNG convention of one step: ``key, next_rng = split(state.rng)``, ``key = fold_in(key, step)``,
``k_label, k_sigma, k_noise, k_dropout = split(key, 4)``; LoRA dropout uses ``fold_in(k_dropout, 1)``.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import optax

from asymflow_jax import asymflow as af
from asymflow_jax import colorspace
from asymflow_jax import experiment
from asymflow_jax import lift
from asymflow_jax import sharding as shd
from asymflow_jax.evaluation import lpips
from asymflow_jax.models import backbone, finetune, repa

SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sample_sigma(key, batch: int, config) -> jax.Array:
  """Logit-normal noise levels with the shift warp and the lower clip (spec section 4)."""
  sigma = jax.nn.sigmoid(config.sigma_mean + config.sigma_std * jax.random.normal(key, (batch,)))
  shift = config.sigma_shift
  sigma = shift * sigma / (1 + (shift - 1) * sigma)
  return jnp.clip(sigma, config.sigma_clip_min, 1.0)


def _student(params, frozen, config, k_drop):
  """(parameter tree, LoRA adapters or None, interception context, rngs) of the model being trained."""
  rngs = {"dropout": k_drop}
  if not experiment.finetuning(config):
    return params, None, contextlib.nullcontext(), rngs
  f = config.finetune
  ctx = finetune.lora_interceptor(scale=experiment.lora_scale(config), dropout=f.lora_dropout)
  rngs[finetune.LORA_DROPOUT] = jax.random.fold_in(k_drop, 1)
  return finetune.overlay(frozen["params"], params), params.get(finetune.LORA), ctx, rngs


def flow_loss(params, batch, key, basis, scale, *, model, config, frozen=None):
  """Flow-matching loss on the recovered velocity, plus the REPA term when ``config.repa.weight`` > 0.
  Returns (mean loss, aux with the per-sample flow loss, sigma and, with REPA, the two terms)."""
  x0 = colorspace.encode(batch["image"], config.model.color_space)
  b = x0.shape[0]
  k_label, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  cond = backbone.condition(model, batch, k_label, config.prob_class)
  sigma = sample_sigma(k_sigma, b, config)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = af.add_noise(x0, noise, sigma)
  student, lora, ctx, rngs = _student(experiment.model_params(params), frozen, config, k_drop)
  use_repa = experiment.repa_enabled(config)
  with ctx:
    out = backbone.velocity(model, student, x_t, sigma, cond, basis, scale=scale, sigma_min=af.TRAIN_SIGMA_MIN,
                            train=True, rngs=rngs, lora=lora, features_after=config.repa.block if use_repa else None)
  u, features = out if use_repa else (out, None)
  w = (sigma / jnp.maximum(sigma, config.loss_sigma_min))[:, None, None, None]
  per_sample = jnp.mean(jnp.square(w * (u - (noise - x0))), axis=(1, 2, 3))
  loss, aux = jnp.mean(per_sample), dict(per_sample=per_sample, sigma=sigma)
  if use_repa:   # clean RGB images -> the frozen encoder's tokens; the projector is trained
    target = experiment.repa_encoder(config).tokens(frozen[experiment.REPA_ENCODER], batch["image"])
    loss_repa = repa.repa_loss(experiment.repa_projector(config), params[experiment.REPA_PROJECTOR], features,
                               target, config.repa.weight)
    aux.update(loss_flow=loss, loss_repa=loss_repa)
    loss = loss + loss_repa
  return loss, aux


def vr_loss(params, batch, key, basis, scale, *, model, config, frozen):
  """AsymFlowVR (+ LPIPS) loss of the student against the frozen lifted teacher (spec section 8).

  ``batch["image"]`` are RGB pixels in [-1, 1]; ``batch[config.vr.latent_key]`` the cached latents
  z (B, h, w, C_l). ``basis`` (D, d) has rows in DiT pixel packing and columns in DiT latent
  packing. Returns (mean loss, aux) with per-sample loss, sigma and the logged terms.
  """
  v, p = config.vr, config.model.patch_size
  space = config.model.color_space
  rgb0 = batch["image"]
  x0 = colorspace.encode(rgb0, space)
  b = x0.shape[0]
  k_label, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  cond = backbone.condition(model, batch, k_label, config.prob_class)
  sigma = jax.nn.sigmoid(config.sigma_mean + config.sigma_std * jax.random.normal(k_sigma, (b,)))
  sigma = config.sigma_shift * sigma / (1 + (config.sigma_shift - 1) * sigma)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x0_lr = lift.low_rank_image(batch[v.latent_key], basis, scale, latent_patch_size=v.latent_patch_size,
                              patch_size=p)
  if x0_lr.shape != x0.shape:
    raise ValueError(f"latents {batch[v.latent_key].shape} with latent patch {v.latent_patch_size} give a low-rank "
                     f"image of shape {x0_lr.shape}, but the images have shape {x0.shape}.")
  s4 = sigma[:, None, None, None]
  x_t, x_t_lr = (1 - s4) * x0 + s4 * noise, (1 - s4) * x0_lr + s4 * noise
  u_ref = backbone.velocity(model, frozen["params"], x_t_lr, sigma, cond, basis, scale=scale,
                            sigma_min=v.teacher_sigma_min)
  x0_ref = jax.lax.stop_gradient(x_t_lr - s4 * u_ref)
  student, lora, ctx, rngs = _student(params, frozen, config, k_drop)
  with ctx:
    u = backbone.velocity(model, student, x_t, sigma, cond, basis, scale=scale, sigma_min=af.TRAIN_SIGMA_MIN,
                          train=True, rngs=rngs, lora=lora)
  x0_hat = x_t - s4 * u
  d_lr = x0_lr - x0_ref
  coef = af.vr_coefficient(x0 - jax.lax.stop_gradient(x0_hat), d_lr, p, eps=v.coef_eps)
  rho = af.loss_shift_rho(sigma, v.loss_shift)[:, None, None, None]
  target = x0 - (1 - rho) * af.broadcast_patches(coef, p) * d_lr
  inv_sc2 = 1.0 / jnp.square(jnp.maximum(s4, config.loss_sigma_min))
  per_sample = v.mse_weight * jnp.mean(jnp.square(x0_hat - target) * inv_sc2, axis=(1, 2, 3))
  aux = dict(loss_mse=jnp.mean(per_sample), vr_coef=jnp.mean(coef))
  if v.lpips_weight > 0:
    n = b if not v.lpips_samples else min(v.lpips_samples, b)   # an unbiased estimate on the first n samples
    pred_rgb = _lpips_rgb(colorspace.decode(x0_hat[:n], space))
    dist = map_in_slices(functools.partial(lpips.lpips_spatial, frozen["lpips"]), v.lpips_chunks,
                         pred_rgb, _lpips_rgb(rgb0[:n]))        # (n, H, W)
    weight = af.vr_gate(coef[:n], p) * (rho[:n] * inv_sc2[:n])[..., 0]
    per_lpips = v.lpips_weight * jnp.mean(dist * weight, axis=(1, 2))
    aux["loss_lpips"] = jnp.mean(per_lpips)
    per_sample = per_sample.at[:n].add(per_lpips * (b / n))
  return jnp.mean(per_sample), dict(per_sample=per_sample, sigma=sigma, **aux)


def map_in_slices(fn, slices: int, *args):
  """``fn(*args)`` for a function that maps each sample (leading axis) on its own, computed over
  ``slices`` slices of the samples one after another (``lax.map``), each recomputed in the backward
  (``jax.checkpoint``): the activation memory of one slice instead of all. Slice j holds samples
  j, j + slices, j + 2 slices, ...: with the batch split over devices in contiguous blocks of a
  multiple of ``slices``, every slice keeps every device busy. ``slices`` 1: ``fn(*args)``."""
  if slices == 1:
    return fn(*args)
  n = args[0].shape[0]
  if n % slices:
    raise ValueError(f"{n} samples cannot be cut into {slices} equal slices.")
  split = lambda a: jnp.swapaxes(a.reshape(n // slices, slices, *a.shape[1:]), 0, 1)
  out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(a) for a in args))
  return jnp.swapaxes(out, 0, 1).reshape(n, *out.shape[2:])


def _lpips_rgb(images):
  """LPIPS takes 3-channel images: grayscale is repeated over RGB."""
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


LOSSES = dict(flow=flow_loss, asymflow_vr=vr_loss)


def _bucket_means(values, sigma):
  edges = jnp.asarray(SIGMA_BUCKETS)
  idx = jnp.clip(jnp.searchsorted(edges, sigma, side="right") - 1, 0, len(SIGMA_BUCKETS) - 2)
  onehot = jax.nn.one_hot(idx, len(SIGMA_BUCKETS) - 1)
  counts = onehot.sum(0)
  return (onehot * values[:, None]).sum(0) / jnp.maximum(counts, 1), counts


def train_step(state: experiment.TrainState, batch, *, model, config, optimizer):
  """One optimisation step. A non-finite loss, gradient or update skips the update (params,
  optimizer state and EMA keep their values) and records the first such step and what was not finite."""
  key, new_rng = jax.random.split(state.rng)
  key = jax.random.fold_in(key, state.step)
  grad_fn = jax.value_and_grad(LOSSES[config.objective], has_aux=True)
  # named scopes: the phases of the step in profiles (bench/profile_step.py, XProf)
  with jax.named_scope("loss_and_grad"):
    (loss, aux), grads = grad_fn(state.params, batch, key, state.basis, state.scale, model=model, config=config,
                                 frozen=state.frozen)
  with jax.named_scope("optimizer"):
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  with jax.named_scope("nonfinite_check"):
    kind = (jnp.where(jnp.isfinite(loss), 0, experiment.NONFINITE_LOSS)
            | jnp.where(jnp.isfinite(grad_norm), 0, experiment.NONFINITE_GRAD)
            | jnp.where(jnp.isfinite(optax.tree.norm(updates)), 0, experiment.NONFINITE_UPDATE)).astype(jnp.int32)
  finite = kind == 0
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  with jax.named_scope("skip_nonfinite"):
    # The barrier makes the new params one materialised value that the EMA reads: otherwise XLA
    # recomputes them from the old params inside the EMA's fusion as well, and since the old params'
    # (donated) buffers are overwritten by the new ones, it copies every parameter at the start of
    # the step to keep the old values readable (XLA:CPU: 98 copies, 30 MB per step on the reference config).
    params = jax.lax.optimization_barrier(keep_old(params, state.params))
  with jax.named_scope("ema"):
    ema = tuple(jax.tree.map(lambda e, p, d=d: p + (e - p) * d, e_tree, params)
                for d, e_tree in zip(experiment.ema_momenta(config, state.step), state.ema))
  first = (state.nonfinite_step < 0) & ~finite
  with jax.named_scope("skip_nonfinite"):
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=keep_old(opt_state, state.opt_state),
        ema=keep_old(ema, state.ema), rng=new_rng,
        nonfinite_step=jnp.where(first, state.step + 1, state.nonfinite_step),
        nonfinite_kind=jnp.where(first, kind, state.nonfinite_kind))
  bucket_loss, bucket_count = _bucket_means(aux["per_sample"], aux["sigma"])
  metrics = dict(loss=loss, grad_norm=grad_norm, lr=experiment.lr_schedule(config)(state.step),
                 loss_by_sigma=bucket_loss, count_by_sigma=bucket_count,
                 terms={k: v for k, v in aux.items() if k not in ("per_sample", "sigma")})
  return new_state, metrics


def batch_spec(exp: experiment.Experiment, latent_shape=None) -> dict:
  """{key: (per-example shape, dtype)} of the batches the data pipeline yields for this experiment.

  Class-conditional: image (H, W, C), label (), plus each ``data.extra_keys`` entry with shape
  ``latent_shape`` (h, w, C_l). Text-to-image (AsymFLUX.2, data source 't2i'): image (H, W, C),
  latents (H/p, W/p, r) (the cached FLUX.2 tokens), prompt_embeds (L, D_text) bfloat16 with
  L = ``model.text_length``, num_tokens ().
  """
  m = exp.config.model
  out = dict(image=((m.input_size, m.input_size, m.in_channels), jnp.float32))
  if backbone.is_text(exp.model):
    g = m.input_size // m.patch_size
    out.update(latents=((g, g, m.rank), jnp.float32),
               prompt_embeds=((m.text_length, exp.model.config.joint_attention_dim), jnp.bfloat16),
               num_tokens=((), jnp.int32))
    return out
  out["label"] = ((), jnp.int32)
  for k in tuple(exp.config.data.get("extra_keys", ())):
    if latent_shape is None:
      raise ValueError(f"the batch has extra key {k!r}: pass latent_shape=(h, w, C) for it.")
    out[k] = (tuple(latent_shape), jnp.float32)
  return out


def batch_shardings(mesh, spec: dict) -> dict:
  """Batch-axis shardings of the batch dict described by ``spec`` (see :func:`batch_spec`)."""
  return {k: shd.batch_sharding(mesh, 1 + len(shape)) for k, (shape, _) in spec.items()}


def train_steps(state: experiment.TrainState, batches, *, model, config, optimizer):
  """``K`` consecutive train steps in one call (``lax.scan``): each ``batches`` leaf is (K, B, ...);
  returns the state after the K-th step and every step's metrics stacked on a leading K axis.
  The same updates as K calls of :func:`train_step` (the step counter, RNG and skip logic advance
  per step). Fewer, longer device calls: the step's temporary buffers are allocated once per call
  (on XLA:CPU each allocation is page-faulted in afresh; see bench/README.md) and the host
  dispatches once per K steps."""
  step = functools.partial(train_step, model=model, config=config, optimizer=optimizer)
  return jax.lax.scan(step, state, batches)


def jit_train_step(exp: experiment.Experiment, steps_per_call: int = 1):
  """The jitted train step of a training experiment, state donated: (state, batch) -> (state,
  metrics), or with ``steps_per_call`` K > 1 :func:`train_steps` (batch leaves (K, B, ...), metrics (K, ...))."""
  kwargs = dict(model=exp.model, config=exp.config, optimizer=exp.optimizer)
  spec = batch_spec(exp, latent_shape=(1, 1, 1))   # only the ranks matter here
  if steps_per_call == 1:
    step, batch_sh = functools.partial(train_step, **kwargs), batch_shardings(exp.mesh, spec)
  else:
    step = functools.partial(train_steps, **kwargs)
    batch_sh = {k: shd.stacked(sh) for k, sh in batch_shardings(exp.mesh, spec).items()}
  return jax.jit(step, in_shardings=(exp.shardings, batch_sh),
                 out_shardings=(exp.shardings, shd.replicated(exp.mesh)), donate_argnums=(0,))


def abstract_batch(exp: experiment.Experiment, latent_shape=None) -> dict:
  """ShapeDtypeStructs (with shardings) of one global batch; ``latent_shape`` (h, w, C_l) for the
  extra keys of a class-conditional config."""
  spec = batch_spec(exp, latent_shape)
  sh = batch_shardings(exp.mesh, spec)
  b = exp.config.batch_size
  return {k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sh[k]) for k, (shape, dtype) in spec.items()}


def lower_train_step(exp: experiment.Experiment):
  """Lowers (no compile, no run) the sharded train step with abstract inputs: a cheap check that a
  large config (e.g. H/16 on a pod mesh) is consistent, before any device memory is used."""
  return jit_train_step(exp).lower(exp.target(), abstract_batch(exp))
