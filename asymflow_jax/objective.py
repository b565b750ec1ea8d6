"""The training objective and the sharded train step (spec section 4).

Loss: sigma = shift-warp(sigmoid(m + s n)) clipped to [sigma_clip_min, 1]; labels kept with
probability ``prob_class`` else the null class; u = AsymJiT(x_sigma) with the train recovery clamp
1e-6; L = mean((w (u - (eps - x0)))^2) with w = sigma / max(sigma, loss_sigma_min).

PRNG convention of one step: ``key, next_rng = split(state.rng)``, ``key = fold_in(key, step)``,
``k_label, k_sigma, k_noise, k_dropout = split(key, 4)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from asymflow_jax import asymflow as af
from asymflow_jax import experiment
from asymflow_jax import sharding as shd
from asymflow_jax.models import asymjit

SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sample_sigma(key, batch: int, config) -> jax.Array:
  """Logit-normal noise levels with the shift warp and the lower clip (spec section 4)."""
  sigma = jax.nn.sigmoid(config.sigma_mean + config.sigma_std * jax.random.normal(key, (batch,)))
  shift = config.sigma_shift
  sigma = shift * sigma / (1 + (shift - 1) * sigma)
  return jnp.clip(sigma, config.sigma_clip_min, 1.0)


def flow_loss(params, batch, key, basis, scale, *, model, config):
  """Flow-matching loss on the recovered velocity. Returns (mean loss, aux with per-sample loss and sigma)."""
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


def train_step(state: experiment.TrainState, batch, *, model, config, optimizer):
  """One optimisation step. A non-finite loss, gradient or update skips the update (params,
  optimizer state and EMA keep their values) and records the first such step and what was not finite."""
  key, new_rng = jax.random.split(state.rng)
  key = jax.random.fold_in(key, state.step)
  grad_fn = jax.value_and_grad(flow_loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, batch, key, state.basis, state.scale, model=model, config=config)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  kind = (jnp.where(jnp.isfinite(loss), 0, experiment.NONFINITE_LOSS)
          | jnp.where(jnp.isfinite(grad_norm), 0, experiment.NONFINITE_GRAD)
          | jnp.where(jnp.isfinite(optax.tree.norm(updates)), 0, experiment.NONFINITE_UPDATE)).astype(jnp.int32)
  finite = kind == 0
  params = optax.apply_updates(state.params, updates)
  ema = tuple(jax.tree.map(lambda e, p, d=d: p + (e - p) * d, e_tree, params)
              for d, e_tree in zip(config.ema_decays, state.ema))
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  first = (state.nonfinite_step < 0) & ~finite
  new_state = state.replace(
      step=state.step + 1, params=keep_old(params, state.params), opt_state=keep_old(opt_state, state.opt_state),
      ema=keep_old(ema, state.ema), rng=new_rng,
      nonfinite_step=jnp.where(first, state.step + 1, state.nonfinite_step),
      nonfinite_kind=jnp.where(first, kind, state.nonfinite_kind))
  bucket_loss, bucket_count = _bucket_means(aux["per_sample"], aux["sigma"])
  metrics = dict(loss=loss, grad_norm=grad_norm, lr=experiment.lr_schedule(config)(state.step),
                 loss_by_sigma=bucket_loss, count_by_sigma=bucket_count)
  return new_state, metrics


def batch_shardings(mesh) -> dict:
  return dict(image=shd.batch_sharding(mesh, 4), label=shd.batch_sharding(mesh, 1))


def jit_train_step(exp: experiment.Experiment):
  """The jitted train step of a training experiment: (state, batch) -> (state, metrics), state donated."""
  step = functools.partial(train_step, model=exp.model, config=exp.config, optimizer=exp.optimizer)
  return jax.jit(step, in_shardings=(exp.shardings, batch_shardings(exp.mesh)),
                 out_shardings=(exp.shardings, shd.replicated(exp.mesh)), donate_argnums=(0,))


def abstract_batch(exp: experiment.Experiment) -> dict:
  m, b = exp.config.model, exp.config.batch_size
  sh = batch_shardings(exp.mesh)
  return dict(image=jax.ShapeDtypeStruct((b, m.input_size, m.input_size, m.in_channels), jnp.float32,
                                         sharding=sh["image"]),
              label=jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh["label"]))


def lower_train_step(exp: experiment.Experiment):
  """Lowers (no compile, no run) the sharded train step with abstract inputs: a cheap check that a
  large config (e.g. H/16 on a pod mesh) is consistent, before any device memory is used."""
  return jit_train_step(exp).lower(exp.target(), abstract_batch(exp))
