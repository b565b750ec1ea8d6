"""AsymJiT: the JiT backbone with the AsymFlow head (spec sections 2-3).

The subspace basis U (D, r) and the scale s are explicit inputs, never module state. Forward:

  k, t = calibrate(sigma, s);  u_A = JiT(k * x_t, t, labels)
  u = recover_velocity(u_A, patchify(x_t), U, sigma, scale=s, sigma_min)   (float32)

With rank r = 0 (basis of shape (D, 0)) this is plain JiT x0-prediction: x0_hat = -u_A and
u = (x_t - x0_hat) / max(sigma, sigma_min).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.asymflow import calibrate, check_basis, patchify, recover_velocity, unpatchify
from asymflow_jax.models.jit_model import JiT, JiTConfig


def asymjit_apply(model: JiT, params, x_t, sigma, labels, basis, *, scale=1.0, sigma_min: float,
                  train: bool = False, rngs=None, return_u_a: bool = False, lora=None,
                  features_after: int | None = None):
  """AsymJiT velocity.

  Args:
    model: the :class:`JiT` backbone module.
    params: its parameters (plain arrays or nn.Partitioned boxes), i.e. ``variables["params"]``.
    x_t: noisy images x_sigma, NHWC (B, H, W, C).
    sigma: noise levels (B,) in [0, 1] (the model receives sigma itself; no flip, no x1000).
    labels: int (B,); ``num_classes`` is the CFG null class.
    basis: U, (D, r) with orthonormal columns, D = p*p*C in (py, px, c) order; r may be 0.
    scale: s (1 for a PCA subspace).
    sigma_min: recovery clamp (``TRAIN_SIGMA_MIN`` when training, ``EVAL_SIGMA_MIN`` for ImageNet eval).
    train: enables dropout (needs ``rngs={"dropout": key}`` when a dropout rate is non-zero).
    return_u_a: also return the raw network output tokens u_A (B, N, D) in the model's dtype.
    lora: LoRA adapters, passed as the "lora" variable collection (applied only inside
      ``finetune.lora_interceptor``).
    features_after: also return the hidden image tokens after this block (B, N, hidden), the REPA features.

  Returns:
    velocity u = eps - x0 estimate, NHWC float32 (B, H, W, C); or (velocity, u_a), (velocity, features),
    (velocity, u_a, features) as asked.
  """
  cfg = model.config
  p = cfg.patch_size
  b, h, w, _ = x_t.shape
  check_basis(basis, cfg.patch_dim)
  x_t = x_t.astype(jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  k, t = calibrate(sigma, scale)
  x_in = (k[:, None, None, None] * x_t).astype(model.dtype)
  out = model.apply({"params": params, **({"lora": lora} if lora else {})}, x_in, t, labels, train=train,
                    rngs=rngs, features_after=features_after)
  u_a, features = out if features_after is not None else (out, None)
  u = recover_velocity(u_a.astype(jnp.float32), patchify(x_t, p), basis.astype(jnp.float32), sigma,
                       scale=scale, sigma_min=sigma_min)
  velocity = unpatchify(u, p, h, w)
  extra = ((u_a,) if return_u_a else ()) + ((features,) if features_after is not None else ())
  return (velocity, *extra) if extra else velocity


def projected_init_gain(cfg: JiTConfig) -> float:
  """Xavier gain match sqrt(2D / (D + bottleneck)) applied to the basis rows of proj1."""
  d = cfg.patch_dim
  return math.sqrt(2.0 * d / (d + cfg.bottleneck_dim))


def apply_projected_init(params, basis, cfg: JiTConfig):
  """Overwrites the first r output channels of the bottleneck proj1 with gain * U.

  Our proj1 kernel is (D, bottleneck) with D in (py, px, c) order, the same order as U's rows, so
  the reference's "U^T reshaped (r, p, p, C) -> conv layout (r, C, p, p)" is simply
  ``kernel[:, :r] = gain * U`` here. Works on plain or nn.Partitioned params; returns a new tree.
  """
  check_basis(basis, cfg.patch_dim)
  r = basis.shape[1]
  if r > cfg.bottleneck_dim:
    raise ValueError(f"rank r={r} exceeds bottleneck_dim={cfg.bottleneck_dim}.")
  leaf = params["x_embedder"]["proj1"]["kernel"]
  boxed = isinstance(leaf, nn.Partitioned)
  kernel = jnp.asarray(leaf.value if boxed else leaf)
  new = kernel.at[:, :r].set((projected_init_gain(cfg) * jnp.asarray(basis, jnp.float32)).astype(kernel.dtype))
  new_leaf = leaf.replace_boxed(new) if boxed else new
  x_emb = {**params["x_embedder"], "proj1": {**params["x_embedder"]["proj1"], "kernel": new_leaf}}
  return {**params, "x_embedder": x_emb}


def init_params(model: JiT, rng, basis=None, *, batch: int = 1, unbox: bool = True):
  """Initialises the backbone (spec section 3 "Init") and applies the projected-bottleneck init.

  Args:
    model: the backbone module.
    rng: a PRNG key.
    basis: optional U (D, r); if given, proj1[:, :r] = sqrt(2D/(D+bottleneck)) * U.
    unbox: return plain arrays (default) instead of nn.Partitioned boxes.

  Returns:
    params tree (``variables["params"]``).
  """
  cfg = model.config
  x = jnp.zeros((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
  params = model.init(rng, x, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))["params"]
  if basis is not None:
    params = apply_projected_init(params, basis, cfg)
  return nn.meta.unbox(params) if unbox else params


def zero_basis(cfg: JiTConfig) -> jnp.ndarray:
  """Rank-0 basis (D, 0): AsymJiT reduces to JiT x0-prediction."""
  return jnp.zeros((cfg.patch_dim, 0), jnp.float32)
