"""Jitted flow ODE samplers (Euler, Heun) with classifier-free guidance (spec section 6).

Conventions: sigma runs 1 -> 0 on the grid sigma_i = warp(linspace(1, 0, N, endpoint=False)),
followed by sigma_N = 0. The start state is the noise itself (x = eps at sigma = 1).

* Euler: N network evaluations, x <- x + u(x, sigma_i) (sigma_{i+1} - sigma_i).
* Heun: for i < N - 1 an Euler predictor to sigma_{i+1}, then the corrector with the mean of the
  two velocities; the last interval sigma_{N-1} -> 0 is a plain Euler step (no evaluation at
  sigma = 0). 2N - 1 evaluations.
* CFG: one network call on the doubled batch [null labels; labels], split as (neg, pos);
  u = pos + (g - 1)(pos - neg) when lo <= sigma <= hi (inclusive, in sigma), else u = pos. Every
  evaluation (incl. Heun's corrector) tests its own sigma. An optional orthogonal-guidance weight
  removes from the bias its component along x0_hat = x - sigma pos.

The guidance scale and interval are traced (changing them never recompiles); the number of steps
and the method are static. The whole loop is one ``lax.fori_loop``.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import tqdm

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import colorspace
from asymflow_jax import image_io
from asymflow_jax import sharding as shd
from asymflow_jax.models import asymjit

METHODS = ("euler", "heun")

# velocity_fn(x (B, ...), sigma (B,), labels (B,)) -> u (B, ...)
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sigma_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
  """(N + 1,) float32 noise levels: warp(linspace(1, 0, N, endpoint=False)) and a final 0."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  raw = np.linspace(1.0, 0.0, num_steps, endpoint=False, dtype=np.float32)
  warped = (shift * raw / (1 + (shift - 1) * raw)).astype(np.float32)
  return np.concatenate([warped, np.zeros((1,), np.float32)])


def guided_velocity(velocity_fn: VelocityFn, x, sigma, labels, *, null_label: int, guidance, interval,
                    orthogonal=0.0):
  """CFG velocity at one evaluation; ``sigma`` is a scalar, ``interval`` = (lo, hi) in sigma.

  Inside the interval (inclusive) the model runs on the doubled batch (conditional + null label);
  outside it, or at guidance 1, only on the conditional half (a ``lax.cond``: both branches are
  compiled once, so new traced intervals or scales never recompile).
  """
  b = x.shape[0]

  def guided(x):
    sig = jnp.full((2 * b,), sigma, jnp.float32)
    both = velocity_fn(jnp.concatenate([x, x]), sig, jnp.concatenate([jnp.full_like(labels, null_label), labels]))
    neg, pos = both[:b], both[b:]
    bias = pos - neg
    x0_hat = x - sigma * pos
    axes = tuple(range(1, x.ndim))
    coef = (jnp.mean(bias * x0_hat, axes, keepdims=True)
            / jnp.maximum(jnp.mean(x0_hat * x0_hat, axes, keepdims=True), 1e-6))
    bias = bias - orthogonal * coef * x0_hat
    return pos + (guidance - 1.0) * bias

  def conditional(x):
    return velocity_fn(x, jnp.full((b,), sigma, jnp.float32), labels)

  on = (sigma >= interval[0]) & (sigma <= interval[1]) & (guidance != 1.0)
  return jax.lax.cond(on, guided, conditional, x)


def sample(velocity_fn: VelocityFn, noise, labels, *, num_steps: int, method: str = "heun", guidance=1.0,
           interval=(0.0, 1.0), null_label: int | None = None, orthogonal=0.0, shift: float = 1.0, cfg: bool = True):
  """Integrates the flow ODE from sigma = 1 (``noise``) to 0. Returns x0 samples, same shape as noise.

  Args:
    velocity_fn: the model's velocity (already in eval mode / eval clamp).
    noise: (B, ...) standard normal start state.
    labels: (B,) int class labels.
    num_steps: N (static). method: "euler" (N evaluations) or "heun" (2N - 1).
    guidance, interval, orthogonal: CFG scale, inclusive sigma interval (lo, hi), orthogonal weight
      (all may be traced).
    null_label: the unconditional class (required when ``cfg``).
    shift: sigma shift warp (1 = none).
    cfg: False skips the doubled batch entirely (no guidance at all).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if cfg and null_label is None:
    raise ValueError("null_label is required for classifier-free guidance (cfg=True).")
  if labels.shape != noise.shape[:1]:
    raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}.")
  grid = jnp.asarray(sigma_grid(num_steps, shift))
  b = noise.shape[0]

  if cfg:
    vel = functools.partial(guided_velocity, velocity_fn, labels=labels, null_label=null_label, guidance=guidance,
                            interval=interval, orthogonal=orthogonal)
    vel_at = lambda x, s: vel(x, s)
  else:
    vel_at = lambda x, s: velocity_fn(x, jnp.full((b,), s, jnp.float32), labels)

  def euler_step(i, x):
    s, s_next = grid[i], grid[i + 1]
    return x + vel_at(x, s) * (s_next - s)

  def heun_step(i, x):
    s, s_next = grid[i], grid[i + 1]
    u = vel_at(x, s)
    x_pred = x + u * (s_next - s)
    return x + 0.5 * (u + vel_at(x_pred, s_next)) * (s_next - s)

  x = noise.astype(jnp.float32)
  if method == "euler":
    return jax.lax.fori_loop(0, num_steps, euler_step, x)
  x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
  return euler_step(num_steps - 1, x)


def num_evaluations(num_steps: int, method: str) -> int:
  return num_steps if method == "euler" else 2 * num_steps - 1


# ------------------------------------------------------------------------------ AsymJiT sampling


def asymjit_velocity_fn(model, params, basis, scale, *, sigma_min: float = af.EVAL_SIGMA_MIN) -> VelocityFn:
  """Eval-mode AsymJiT velocity with the inference recovery clamp."""
  def fn(x, sigma, labels):
    return asymjit.asymjit_apply(model, params, x, sigma, labels, basis, scale=scale, sigma_min=sigma_min, train=False)
  return fn


def noise_and_labels(key, indices, shape, num_classes: int):
  """Per-sample noise from ``fold_in(key, index)`` and class-balanced labels ``index % num_classes``.

  Depends only on the global sample indices, never on how they are split over hosts/devices.
  """
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)
  return noise, (indices % num_classes).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "method", "shift", "sigma_min", "cfg",
                                             "color_space"))
def generate(model, params, basis, scale, key, indices, guidance, interval, *, num_steps: int, method: str = "heun",
             shift: float = 1.0, sigma_min: float = af.EVAL_SIGMA_MIN, cfg: bool = True, color_space: str = "rgb"):
  """RGB images (B, H, W, C) in [-1, 1] for global sample ``indices`` (B,); one compiled loop.

  ``guidance`` and ``interval`` are traced: new values reuse the compiled executable. The sampled
  state is in the model's ``color_space`` and decoded to RGB before clipping.
  """
  cfg_m = model.config
  shape = (cfg_m.input_size, cfg_m.input_size, cfg_m.in_channels)
  noise, labels = noise_and_labels(key, indices, shape, cfg_m.num_classes)
  vel = asymjit_velocity_fn(model, params, basis, scale, sigma_min=sigma_min)
  x = sample(vel, noise, labels, num_steps=num_steps, method=method, guidance=guidance, interval=interval,
             null_label=cfg_m.num_classes, shift=shift, cfg=cfg)
  return jnp.clip(colorspace.decode(x, color_space), -1.0, 1.0)


def generate_on_mesh(model, params, basis, scale, mesh, start: int, num: int, *, seed: int, guidance: float,
                     interval, num_steps: int, method: str = "heun", sigma_min: float = af.EVAL_SIGMA_MIN,
                     color_space: str = "rgb") -> np.ndarray:
  """uint8 images (num, H, W, C) for global indices [start, start + num), batch-sharded over ``mesh``.

  The index range is padded to a multiple of the data-parallel size and cropped; every process
  receives all images. Guidance 1 skips the unconditional half of the batch. Raises
  FloatingPointError if any image is not finite (a NaN model or guidance never becomes a PNG).
  """
  if not np.isfinite(guidance) or not all(np.isfinite(v) for v in interval):
    raise ValueError(f"guidance={guidance} and interval={tuple(interval)} must be finite.")
  n = num + (-num) % shd.batch_divisor(mesh)
  indices = jax.device_put(jnp.arange(start, start + n), shd.batch_sharding(mesh, 1))
  images = generate(model, params, basis, scale, jax.random.key(seed), indices, jnp.float32(guidance),
                    (jnp.float32(interval[0]), jnp.float32(interval[1])), num_steps=num_steps, method=method,
                    cfg=guidance != 1.0, sigma_min=float(sigma_min), color_space=color_space)
  return image_io.to_uint8(multihost_utils.process_allgather(images, tiled=True)[:num])


def generate_from_config(model, params, basis, scale, mesh, *, sample_config, num: int, seed: int,
                         batch: int | None = None, progress: bool = False, color_space: str = "rgb") -> np.ndarray:
  """uint8 RGB images (num, H, W, C) for global indices [0, num) with the sampler settings of
  ``sample_config`` (``num_steps``, ``method``, ``guidance``, ``interval``, ``sigma_min``), ``batch``
  global indices per compiled call (default: all at once; rounded up to the data-parallel size).
  ``color_space`` is the model's pixel representation (``config.model.color_space``).

  The images do not depend on ``batch``, the number of devices or of hosts.
  """
  s = sample_config
  if num < 1:
    raise ValueError(f"num={num}: expected at least 1 image.")
  divisor = shd.batch_divisor(mesh)
  batch = num if batch is None else batch
  if batch < 1:
    raise ValueError(f"batch={batch}: expected at least 1.")
  batch = min(batch, num)
  batch += (-batch) % divisor
  starts = range(0, num, batch)
  if progress and jax.process_index() == 0:
    starts = tqdm.tqdm(starts, desc="sample", unit="batch")
  return np.concatenate([
      generate_on_mesh(model, params, basis, scale, mesh, start, batch, seed=seed, guidance=s.guidance,
                       interval=tuple(s.interval), num_steps=s.num_steps, method=s.method,
                       sigma_min=s.get("sigma_min", af.EVAL_SIGMA_MIN), color_space=color_space)
      for start in starts])[:num]
