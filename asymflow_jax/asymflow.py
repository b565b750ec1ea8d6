"""AsymFlow core math: patch packing, subspace projections, targets and velocity recovery.

Conventions (see ``../shared/spec/asymflow.md``, sections 1-2):

* ``sigma`` is the noise level in [0, 1]; sigma = 1 is pure noise. ``x_t = (1 - sigma) x0 + sigma eps``.
* The velocity is ``u = eps - x0`` (= dx/dsigma); samplers integrate sigma from 1 to 0.
* Tokens have shape (B, N, D) with D = p*p*C. Tokens are row vectors: the projection onto the
  subspace spanned by the orthonormal columns of ``basis`` (U, shape (D, r)) is ``x U U^T``. It is
  always computed as two thin matmuls, never through a D x D matrix.
* ``scale`` (s) is 1 for a PCA subspace; s != 1 only for a latent lift (Procrustes).

Every function here is pure and jit-able. Shape and dtype errors are raised at trace time; value
checks (sigma range, orthonormality) run whenever the values are concrete (eager calls, host code)
and are skipped for traced values, whose validity the caller (sampler, train step) guarantees.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

# Recovery clamps of the reference (spec section 2): train mode and the ImageNet eval configs.
TRAIN_SIGMA_MIN = 1e-6
EVAL_SIGMA_MIN = 4e-2

# The subspace matmuls are tiny (D x r); run them at full float32 precision on every backend
# (TPUs otherwise use bf16 passes for float32 matmuls).
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- validation helpers


def _concrete(x):
  """Returns ``x`` as a numpy array if its value is known now, else None (traced under jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_float(name, x):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}.")


def _check_tokens(name, x):
  _check_float(name, x)
  if x.ndim != 3:
    raise ValueError(f"{name} must be tokens of shape (B, N, D), got shape {tuple(x.shape)}.")


def _check_same(names, *arrays):
  shapes = [tuple(a.shape) for a in arrays]
  dtypes = [jnp.asarray(a).dtype for a in arrays]
  if len(set(shapes)) != 1:
    raise ValueError(f"{', '.join(names)} must have the same shape, got {shapes}.")
  if len(set(dtypes)) != 1:
    raise ValueError(f"{', '.join(names)} must have the same dtype, got {[str(d) for d in dtypes]}.")


def check_basis(basis, dim: int | None = None, *, atol: float = 1e-4):
  """Validates a subspace basis U of shape (D, r) with orthonormal columns.

  Shape checks always run; the orthonormality check (max |U^T U - I| <= atol) runs when the
  values are concrete. Returns ``basis`` unchanged.
  """
  _check_float("basis", basis)
  if basis.ndim != 2:
    raise ValueError(f"basis must have shape (D, r), got shape {tuple(basis.shape)}.")
  d, r = basis.shape
  if dim is not None and d != dim:
    raise ValueError(f"basis has {d} rows but tokens have dimension D={dim}; expected shape ({dim}, r).")
  if r > d:
    raise ValueError(f"rank r={r} exceeds the patch dimension D={d}; expected 0 <= r <= D.")
  values = _concrete(basis)
  if values is not None and r > 0:
    u = values.astype(np.float64)
    err = float(np.max(np.abs(u.T @ u - np.eye(r))))
    if not np.isfinite(err) or err > atol:
      raise ValueError(
          f"basis columns are not orthonormal: max |U^T U - I| = {err:.3g} > {atol:g}. "
          "Pass a basis with orthonormal columns (e.g. from asymflow_jax.subspace).")
  return basis


def check_sigma(sigma, batch: int | None = None):
  """Validates noise levels: a float array of shape (B,) with values in [0, 1]."""
  _check_float("sigma", sigma)
  if sigma.ndim != 1 or (batch is not None and sigma.shape[0] != batch):
    want = f"({batch},)" if batch is not None else "(B,)"
    raise ValueError(f"sigma must have shape {want} (one noise level per sample), got shape {tuple(sigma.shape)}.")
  values = _concrete(sigma)
  if values is not None and values.size and not (np.all(values >= 0.0) and np.all(values <= 1.0)):
    bad = values[(values < 0) | (values > 1) | ~np.isfinite(values)]
    raise ValueError(f"sigma must lie in [0, 1], got values {bad[:4].tolist()}.")
  return sigma


def check_scale(scale):
  """Validates the latent-lift scale s (a positive scalar)."""
  s = jnp.asarray(scale)
  if s.ndim != 0:
    raise ValueError(f"scale must be a scalar, got shape {tuple(s.shape)}.")
  values = _concrete(scale)
  if values is not None and not (np.isfinite(values) and values > 0):
    raise ValueError(f"scale must be a finite positive number, got {float(values)}.")
  return scale


def _per_sample(v, x):
  """Reshapes per-sample values (B,) to broadcast against tokens (B, N, D)."""
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------------- patch packing


def patchify(images, p: int, *, channel_first: bool = False):
  """Cuts NHWC images (B, H, W, C) into tokens (B, N, D).

  N = (H/p)(W/p) in row-major (h, w) order; D = p*p*C flattened in (py, px, c) order (the DiT/JiT
  convention, channel fastest), or in (c, py, px) order with ``channel_first=True`` (the
  Procrustes/FLUX convention).
  """
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC with shape (B, H, W, C), got shape {tuple(images.shape)}.")
  if not isinstance(p, (int, np.integer)) or p < 1:
    raise ValueError(f"patch size p must be a positive integer, got {p!r}.")
  b, h, w, c = images.shape
  if h % p or w % p:
    raise ValueError(f"image size H={h}, W={w} is not divisible by the patch size p={p}.")
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4) if channel_first else x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int, *, channel_first: bool = False):
  """Inverse of :func:`patchify`: tokens (B, N, D) to NHWC images (B, h, w, D // p^2)."""
  if tokens.ndim != 3:
    raise ValueError(f"tokens must have shape (B, N, D), got shape {tuple(tokens.shape)}.")
  if not isinstance(p, (int, np.integer)) or p < 1:
    raise ValueError(f"patch size p must be a positive integer, got {p!r}.")
  if h % p or w % p:
    raise ValueError(f"image size H={h}, W={w} is not divisible by the patch size p={p}.")
  b, n, d = tokens.shape
  if n != (h // p) * (w // p) or d % (p * p):
    raise ValueError(
        f"tokens of shape {tuple(tokens.shape)} do not tile a {h}x{w} image with patch {p}: "
        f"expected N={(h // p) * (w // p)} and D a multiple of {p * p}.")
  c = d // (p * p)
  if channel_first:
    x = tokens.reshape(b, h // p, w // p, c, p, p).transpose(0, 1, 4, 2, 5, 3)
  else:
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


# ------------------------------------------------------------------------------------ projections


def project(x, basis):
  """Subspace part Pi x = (x U) U^T of tokens x (..., D); U is (D, r)."""
  _check_float("x", x)
  check_basis(basis, x.shape[-1])
  coords = jnp.matmul(x, basis.astype(x.dtype), precision=_HIGHEST)
  return jnp.matmul(coords, basis.T.astype(x.dtype), precision=_HIGHEST)


def complement(x, basis):
  """Complement part (I - Pi) x of tokens x (..., D)."""
  return x - project(x, basis)


# ----------------------------------------------------------------------- flow-matching conversions


def add_noise(x0, noise, sigma):
  """x_sigma = (1 - sigma) x0 + sigma eps for tokens (B, N, D) and sigma (B,)."""
  _check_same(("x0", "noise"), x0, noise)
  check_sigma(sigma, x0.shape[0])
  s = _per_sample(sigma, x0).astype(x0.dtype)
  return (1 - s) * x0 + s * noise


def velocity(x0, noise):
  """Flow-matching velocity u = eps - x0."""
  _check_same(("x0", "noise"), x0, noise)
  return noise - x0


def x0_from_velocity(x_t, u, sigma):
  """x0 = x_sigma - sigma u."""
  _check_same(("x_t", "u"), x_t, u)
  check_sigma(sigma, x_t.shape[0])
  return x_t - _per_sample(sigma, x_t).astype(x_t.dtype) * u


def noise_from_velocity(x_t, u, sigma):
  """eps = x_sigma + (1 - sigma) u."""
  _check_same(("x_t", "u"), x_t, u)
  check_sigma(sigma, x_t.shape[0])
  return x_t + (1 - _per_sample(sigma, x_t).astype(x_t.dtype)) * u


def velocity_from_x0(x_t, x0, sigma, *, sigma_min: float):
  """u = (x_sigma - x0) / max(sigma, sigma_min): JiT's x0-prediction to velocity."""
  _check_same(("x_t", "x0"), x_t, x0)
  check_sigma(sigma, x_t.shape[0])
  sc = jnp.maximum(_per_sample(sigma, x_t), sigma_min).astype(x_t.dtype)
  return (x_t - x0) / sc


def velocity_from_noise(x_t, noise, sigma, *, sigma_max: float = 1.0 - 1e-6):
  """u = (eps - x_sigma) / (1 - min(sigma, sigma_max)): epsilon-prediction to velocity."""
  _check_same(("x_t", "noise"), x_t, noise)
  check_sigma(sigma, x_t.shape[0])
  sc = 1 - jnp.minimum(_per_sample(sigma, x_t), sigma_max).astype(x_t.dtype)
  return (noise - x_t) / sc


# --------------------------------------------------------------------------------------- AsymFlow


def calibrate(sigma, scale=1.0):
  """Per-sample calibration k = 1 / (s + (1 - s) sigma) and the network time t = sigma k.

  The backbone is fed ``k * x_sigma`` and time ``sigma * k`` (both identities for s = 1).
  Returns (k, t), each of shape (B,) and sigma's dtype. Uses the unclamped sigma.
  """
  check_sigma(sigma)
  check_scale(scale)
  s = jnp.asarray(scale, sigma.dtype)
  k = 1.0 / (s + (1 - s) * sigma)
  return k, sigma * k


def asymmetric_target(x0, noise, basis, scale=1.0):
  """The network's regression target u_A = Pi eps - x0 / s, tokens (B, N, D)."""
  _check_tokens("x0", x0)
  _check_same(("x0", "noise"), x0, noise)
  check_basis(basis, x0.shape[-1])
  check_scale(scale)
  return project(noise, basis) - x0 / jnp.asarray(scale, x0.dtype)


def recover_velocity(u_a, x_t, basis, sigma, *, scale=1.0, sigma_min: float):
  """Full velocity u from the asymmetric velocity u_A (spec section 2).

    u = s k Pi u_A + (1 - s k) / sigma_c Pi x_t + (I - Pi)(x_t + s u_A) / sigma_c,

  with k = 1 / (s + (1 - s) sigma) from the unclamped sigma and sigma_c = max(sigma, sigma_min)
  used only in the two divisions. For s = 1: u = Pi u_A + (I - Pi)(x_t + u_A) / sigma_c.

  Args:
    u_a: network output, tokens (B, N, D).
    x_t: the noisy state x_sigma (uncalibrated), tokens (B, N, D), same dtype as ``u_a``.
    basis: U, (D, r) orthonormal columns.
    sigma: (B,) noise levels in [0, 1].
    scale: s, scalar.
    sigma_min: recovery clamp (``TRAIN_SIGMA_MIN`` in training, ``EVAL_SIGMA_MIN`` for ImageNet eval).

  Returns:
    u, tokens (B, N, D), computed in at least float32.
  """
  _check_tokens("u_a", u_a)
  _check_same(("u_a", "x_t"), u_a, x_t)
  check_basis(basis, u_a.shape[-1])
  check_sigma(sigma, u_a.shape[0])
  check_scale(scale)
  if not sigma_min > 0:
    raise ValueError(f"sigma_min must be positive, got {sigma_min}.")
  dtype = jnp.promote_types(u_a.dtype, jnp.float32)
  u_a, x_t, sigma = u_a.astype(dtype), x_t.astype(dtype), sigma.astype(dtype)
  s = jnp.asarray(scale, dtype)
  k, _ = calibrate(sigma, s)
  sk = _per_sample(s * k, u_a)
  one_minus_sk = _per_sample((1 - s) * sigma * k, u_a)  # = 1 - s k, without the cancellation
  inv_sc = 1.0 / jnp.maximum(_per_sample(sigma, u_a), sigma_min)
  full = x_t + s * u_a                      # (I - Pi) of this is the complement term
  p_u, p_x = project(u_a, basis), project(x_t, basis)
  return sk * p_u + one_minus_sk * inv_sc * p_x + (full - (p_x + s * p_u)) * inv_sc


# ------------------------------------------------------------------------ AsymFlowVR (spec section 8)


def loss_shift_rho(sigma, shift: float):
  """Loss-shift schedule rho(sigma) = (1 - sigma)^2 / ((1 - sigma)^2 + (shift sigma)^2), shape of sigma.

  rho(0) = 1, rho(1) = 0. ``shift <= 0`` means no schedule (the reference's ``loss_shift=None``):
  rho = 0 everywhere.
  """
  if shift <= 0:
    return jnp.zeros_like(sigma)
  a2 = jnp.square(1 - sigma)
  return a2 / (a2 + jnp.square(shift * sigma))


def _patch_means(x, p: int):
  """Per (sample, patch, channel) mean over the p x p pixels: NHWC (B, H, W, C) -> (B, H/p, W/p, C)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}.")
  return jnp.mean(x.reshape(b, h // p, p, w // p, p, c), axis=(2, 4))


def broadcast_patches(v, p: int):
  """(B, h, w, C) per-patch values -> (B, h p, w p, C), each value repeated over its p x p pixels."""
  return jnp.repeat(jnp.repeat(v, p, axis=1), p, axis=2)


def vr_coefficient(d_full, d_lr, patch_size: int, *, eps: float = 1e-4):
  """AsymFlowVR coefficient per (sample, pixel patch, channel), NHWC (B, H/p, W/p, C):

    c = clip(mean(d_full d_lr) / max(mean(d_lr^2), eps), 0, 1),  means over the p x p pixels,

  with d_lr = x0^lr - x0_hat^lr (frozen teacher's error on the low-rank data) and
  d_full = x0 - x0_hat (the student's error; the caller stops its gradient). Both NHWC images.
  """
  _check_same(("d_full", "d_lr"), d_full, d_lr)
  num = _patch_means(d_full * d_lr, patch_size)
  den = jnp.maximum(_patch_means(jnp.square(d_lr), patch_size), eps)
  return jnp.clip(num / den, 0.0, 1.0)


def vr_gate(coef, patch_size: int):
  """The LPIPS gate sqrt(mean over channels of c^2), broadcast over each patch: (B, H, W)."""
  return broadcast_patches(jnp.sqrt(jnp.mean(jnp.square(coef), axis=-1, keepdims=True)), patch_size)[..., 0]
