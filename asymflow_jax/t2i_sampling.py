"""Text-to-image sampler of AsymFLUX.2 klein (spec section 8): FlowAdapter(UniPC), CFG with
orthogonal guidance, the denoised clamp and the sqrt dynamic shift of the pixel klein pipeline.

Ground truth: LakonLab @ 84566d5 (``schedulers/flow_adapter.py``, ``pipeline_pixelflux2_klein.py``,
``gaussian_flow.guidance_jit``) and diffusers 0.42 ``UniPCMultistepScheduler``.

Schedule (``FlowAdapterScheduler.set_timesteps``, all float32): raw = linspace(1, 0, N,
endpoint=False); sigma = shift raw / (1 + (shift - 1) raw), then a final sigma 0. The model sees
t / 1000 with t = 1000 sigma (float32), i.e. sigma_0 = 1; the UniPC solver uses the same sigmas
clamped to <= 1 - 1e-4.

Dynamic shift (``FlowAdapterScheduler.get_shift``, sqrt type, pipeline settings): with
seq_len = H W (image pixels, not patches), shift = 17 + (sqrt(seq_len) - 1024) m,
m = (34 - 17) / (2048 - 1024), so 1024^2 px -> 17 and 2048^2 px -> 34 (= 17 sqrt(HW) / 1024).

Solver: diffusers' UniPC as FlowAdapter configures it: ``flow_prediction`` with flow sigmas
(alpha = 1 - sigma), solver_order 2, solver_type ``bh2``, predict_x0, lower_order_final, final
sigma 0, corrector on every step after the first (disable_corrector = []), no thresholding. With
lambda = log(alpha / sigma), h = lambda_{i+1} - lambda_i and the data prediction m_i = x_i -
sigma_i u_i at the solver sigma:

* corrector (UniC, step i >= 1, order of the previous predictor): the model output at the
  predicted x_i corrects it, x_i^c = UniC(x_{i-1}^c, m_{i-1}, m_{i-2}, m_i); m_i is not
  re-evaluated; the corrected state is what the next predictor starts from.
* predictor (UniP, order 1 at the first and the last step, else 2): x_{i+1} = (sigma_{i+1} /
  sigma_i) x_i^c - alpha_{i+1} expm1(-h) m_i - alpha_{i+1} expm1(-h) / 2 (m_{i-1} - m_i) / r,
  r = (lambda_{i-1} - lambda_i) / h. The last step (to sigma 0) returns m_{N-1} exactly.

The per-step coefficients depend only on (num_steps, shift), so they are computed once in float64
NumPy (diffusers computes them in float32 torch; the difference is a few float32 ulps).

Guidance (``guidance_jit`` as the pipeline calls it; acts on the velocity u): bias = (pos - neg)
(g - 1); d = x - sigma pos (the conditional x0 prediction); bias -= w <bias, d> / max(<d, d>,
1e-6) d with <a, b> the per-sample mean over all non-batch axes; u = pos + bias.

Denoised clamp (pipeline ``clamp_denoised``, on the guided u): x0 = x - sigma u; x0 <-
encode(clip(decode(x0), -1, 1)) with the pipeline's colour encoder (``colorspace`` ``"oklab"``:
Oklab mean (0.56, 0, 0.01), std 0.16; its decode clamps linear RGB to [0, 1]); u = (x - x0) /
max(sigma, 1e-4). Here sigma is the model sigma (1 at the first step).

Layout: states are channels last (B, ..., C); everything is float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from asymflow_jax import colorspace
from asymflow_jax import image_io
from asymflow_jax.models import asymflux2

NUM_TRAIN_TIMESTEPS = 1000   # FlowAdapter default: timesteps = 1000 sigma, the model sees t / 1000
SOLVER_SIGMA_MAX = 1 - 1e-4  # FlowAdapter clamps the UniPC sigmas to <= 1 - eps (eps = 1e-4)
BASE_SEQ_LEN = 1024 ** 2     # pixel klein pipeline: FlowAdapterScheduler(base_seq_len=1024 ** 2, ...
MAX_SEQ_LEN = 2048 ** 2      # ... max_seq_len=2048 ** 2,
BASE_SHIFT = 17.0            # ... base_logshift=log(17), ...
MAX_SHIFT = 34.0             # ... max_logshift=log(34), dynamic_shifting_type='sqrt')
CLAMP_SIGMA_MIN = 1e-4       # pipeline: u = (x - x0) / sigma.clamp(min=1e-4)
ORTHOGONAL_EPS = 1e-6        # guidance_jit: <d, d>.clamp(min=1e-6)

# velocity_fn(params, x (B, ..., C), sigma (B,), cond) -> u (B, ..., C)
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


# ------------------------------------------------------------------------------------ schedule


def dynamic_shift(seq_len, *, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                  base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
  """FlowAdapter's ``sqrt`` dynamic shift for ``seq_len`` = image pixels H W (float64, as the reference:
  the shifts go through exp(log(.)) because the scheduler is configured with log-shifts)."""
  hi, lo = np.exp(np.log(max_shift)), np.exp(np.log(base_shift))
  m = (hi - lo) / (np.sqrt(max_seq_len) - np.sqrt(base_seq_len))
  return float((np.sqrt(seq_len) - np.sqrt(base_seq_len)) * m + lo)


def image_shift(height: int, width: int) -> float:
  """The pixel klein pipeline's shift for an H x W image: 17 at 1024^2, 34 at 2048^2."""
  return dynamic_shift(height * width)


def flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
  """(N + 1,) float32 FlowAdapter sigmas: shift-warped linspace(1, 0, N, endpoint=False), then 0."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if not np.isfinite(shift) or shift <= 0:
    raise ValueError(f"shift must be finite and > 0, got {shift}.")
  raw = np.linspace(1, 0, num_steps, endpoint=False, dtype=np.float32)
  # torch: a float32 tensor times a Python/NumPy float64 scalar computes in float32 with the
  # scalar rounded to float32; (shift - 1) is formed in float64 first.
  warped = np.float32(shift) * raw / (np.float32(1) + np.float32(shift - 1) * raw)
  return np.concatenate([warped.astype(np.float32), np.zeros((1,), np.float32)])


def model_sigmas(sigmas: np.ndarray) -> np.ndarray:
  """(N,) float32 sigmas the model sees: t / 1000 with t = 1000 sigma (both float32)."""
  scale = np.float32(NUM_TRAIN_TIMESTEPS)
  return ((np.asarray(sigmas[:-1], np.float32) * scale) / scale).astype(np.float32)


def solver_sigmas(sigmas: np.ndarray) -> np.ndarray:
  """(N + 1,) float32 sigmas UniPC integrates over: clamped to <= 1 - 1e-4."""
  return np.minimum(np.asarray(sigmas, np.float32), np.float32(SOLVER_SIGMA_MAX))


# ------------------------------------------------------------------------------------ UniPC


class UniPCPlan(NamedTuple):
  """Per-step (N,) float32 coefficients of the UniPC-2 (bh2, x0 form) flow solver, step i:

    xc     = corr_ratio x_prev_c + corr_x0 m_{i-1} + corr_d1 (m_{i-2} - m_{i-1}) + corr_dt (m_i - m_{i-1})
    x_next = pred_ratio xc + pred_x0 m_i + pred_d1 (m_{i-1} - m_i)

  with m_i = x_i - solver_sigma_i u(x_i, model_sigma_i). Step 0 has the identity corrector.
  """
  model_sigma: np.ndarray
  solver_sigma: np.ndarray
  corr_ratio: np.ndarray
  corr_x0: np.ndarray
  corr_d1: np.ndarray
  corr_dt: np.ndarray
  pred_ratio: np.ndarray
  pred_x0: np.ndarray
  pred_d1: np.ndarray


def predictor_orders(num_steps: int) -> np.ndarray:
  """(N,) UniP orders: min(solver_order 2, N - i (lower_order_final), i + 1 (warm-up))."""
  i = np.arange(num_steps)
  return np.minimum(np.minimum(2, num_steps - i), i + 1)


def unipc_plan(num_steps: int, shift: float) -> UniPCPlan:
  """The solver coefficients for FlowAdapter(UniPC) with ``num_steps`` and ``shift`` (float64 -> float32)."""
  sig = flow_sigmas(num_steps, shift)
  s = solver_sigmas(sig).astype(np.float64)
  a = 1.0 - s
  with np.errstate(divide="ignore"):
    lam = np.log(a) - np.log(s)   # +inf at the final sigma 0
  order = predictor_orders(num_steps)
  n = num_steps
  plan = {k: np.zeros((n,), np.float64) for k in UniPCPlan._fields}
  plan["corr_ratio"][0] = 1.0
  for i in range(n):
    # predictor i -> i + 1
    if i == n - 1:   # to sigma 0: x_next = m_i (alpha 1, expm1(-inf) = -1, order 1)
      plan["pred_x0"][i] = 1.0
    else:
      h = lam[i + 1] - lam[i]
      bh = np.expm1(-h)   # bh2: B(h) = expm1(hh), hh = -h; also h phi_1 for the x0 form
      plan["pred_ratio"][i] = s[i + 1] / s[i]
      plan["pred_x0"][i] = -a[i + 1] * bh
      if order[i] == 2:   # rhos_p = 0.5 for order 2
        rk = (lam[i - 1] - lam[i]) / h
        plan["pred_d1"][i] = -a[i + 1] * bh * 0.5 / rk
    # corrector at i (uses the previous predictor's order)
    if i >= 1:
      h = lam[i] - lam[i - 1]
      hh = -h
      bh = np.expm1(hh)
      plan["corr_ratio"][i] = s[i] / s[i - 1]
      plan["corr_x0"][i] = -a[i] * bh
      if order[i - 1] == 1:   # rhos_c = 0.5 for order 1
        plan["corr_dt"][i] = -a[i] * bh * 0.5
      else:
        rk = (lam[i - 2] - lam[i - 1]) / h
        phi = bh / hh - 1.0
        b1 = phi / bh
        b2 = (phi / hh - 0.5) * 2.0 / bh
        rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
        plan["corr_d1"][i] = -a[i] * bh * rho[0] / rk
        plan["corr_dt"][i] = -a[i] * bh * rho[1]
  plan["model_sigma"] = model_sigmas(sig)
  plan["solver_sigma"] = s[:-1]
  return UniPCPlan(**{k: np.asarray(v, np.float32) for k, v in plan.items()})


def unipc_solve(velocity, x, plan: UniPCPlan, *, trajectory: bool = False):
  """Runs FlowAdapter(UniPC) from ``x`` (B, ...) at sigma 1 down to 0 (one ``lax.scan``).

  Args:
    velocity: ``velocity(x, sigma) -> u``: the (guided, clamped) flow velocity eps - x0 at the
      scalar model sigma; one call per step.
    x: (B, ...) start state (the noise).
    plan: :func:`unipc_plan`.
    trajectory: also return the (N, B, ...) states after each step (the pipeline's ``latents``).

  Returns:
    the final state (B, ...) float32, or (final, trajectory).
  """
  x = jnp.asarray(x, jnp.float32)
  rows = jax.tree.map(jnp.asarray, plan)

  def step(carry, row):
    x, xc_prev, m1, m2 = carry
    u = jnp.asarray(velocity(x, row.model_sigma), jnp.float32)
    m = x - row.solver_sigma * u
    xc = row.corr_ratio * xc_prev + row.corr_x0 * m1 + row.corr_d1 * (m2 - m1) + row.corr_dt * (m - m1)
    x_next = row.pred_ratio * xc + row.pred_x0 * m + row.pred_d1 * (m1 - m)
    return (x_next, xc, m, m1), (x_next if trajectory else None)

  zeros = jnp.zeros_like(x)
  (x, _, _, _), traj = jax.lax.scan(step, (x, x, zeros, zeros), rows)
  return (x, traj) if trajectory else x


# ------------------------------------------------------------------------- guidance and clamp


def _per_sample(v, ndim: int):
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def orthogonal_cfg(pos, neg, x, sigma, guidance, orthogonal):
  """Guided velocity pos + bias (LakonLab ``guidance_jit`` with parallel_dir = x - sigma pos).

  Args: pos, neg, x (B, ...) float32; sigma scalar model sigma; guidance, orthogonal scalars or (B,).
  """
  guidance, orthogonal = _per_sample(guidance, pos.ndim), _per_sample(orthogonal, pos.ndim)
  bias = (pos - neg) * (guidance - 1)
  d = x - pos * sigma
  axes = tuple(range(1, pos.ndim))
  coef = jnp.mean(bias * d, axes, keepdims=True) / jnp.maximum(jnp.mean(d * d, axes, keepdims=True), ORTHOGONAL_EPS)
  return pos + (bias - coef * d * orthogonal)


def clamp_velocity(u, x, sigma, color_space: str = "oklab"):
  """The pipeline's denoised clamp: x0 = x - sigma u is decoded to RGB, clipped to [-1, 1], re-encoded;
  returns (x - x0) / max(sigma, 1e-4). ``x`` and ``u`` are channels last (B, ..., C)."""
  x0 = x - u * sigma
  image = jnp.clip(colorspace.decode(x0, color_space), -1.0, 1.0)
  x0 = colorspace.encode(image, color_space)
  return (x - x0) / jnp.maximum(sigma, CLAMP_SIGMA_MIN)


def _concat(a, b):
  return jax.tree.map(lambda p, q: jnp.concatenate([p, q]), a, b)


def seq_len_of(shape) -> int:
  """The pipeline's seq_len of a (B, ..., C) state: the product of its spatial sizes (H W pixels)."""
  return int(np.prod(shape[1:-1]))


@functools.partial(jax.jit, static_argnames=("velocity_fn", "num_steps", "shift", "clamp_denoised", "color_space",
                                             "batch_cfg", "trajectory"))
def sample_t2i(velocity_fn: VelocityFn, params, noise, cond, neg_cond=None, guidance=4.0, orthogonal=1.0, *,
               num_steps: int = 32, shift: float | None = None, clamp_denoised: bool = True,
               color_space: str = "oklab", batch_cfg: bool = True, trajectory: bool = False):
  """AsymFLUX.2 klein text-to-image sampling: FlowAdapter(UniPC) from ``noise`` to the final state.

  Args:
    velocity_fn: ``velocity_fn(params, x, sigma (B,), cond) -> u``, the flow velocity eps - x0
      (static; must be hashable, e.g. a module-level function).
    params: model parameters (traced).
    noise: (B, H, W, C) standard normal start state (the state at sigma 1), channels last.
    cond, neg_cond: conditioning pytrees with batch-leading leaves (prompt / negative prompt
      embeddings); ``neg_cond=None`` runs without CFG (the pipeline skips CFG when guidance <= 1).
    guidance, orthogonal: CFG scale and orthogonal weight (traced; scalars or (B,)).
    num_steps: N, one (guided) velocity evaluation per step (static).
    shift: sigma shift (static); None -> the dynamic shift :func:`dynamic_shift` of H W.
    clamp_denoised: apply the denoised clamp in ``color_space`` (static).
    batch_cfg: evaluate [neg; pos] as one doubled batch (cond leaves are concatenated) instead of
      two calls (static).
    trajectory: also return the (N, B, H, W, C) states after each step (static).

  Returns:
    the final state (B, H, W, C) float32 (model pixels; decode with ``colorspace.decode``), or
    (final, trajectory).
  """
  noise = jnp.asarray(noise, jnp.float32)
  b = noise.shape[0]
  if shift is None:
    shift = dynamic_shift(seq_len_of(noise.shape))
  plan = unipc_plan(num_steps, shift)

  def velocity(x, sigma):
    sig = jnp.full((b,), sigma, jnp.float32)
    if neg_cond is None:
      u = jnp.asarray(velocity_fn(params, x, sig, cond), jnp.float32)
    else:
      if batch_cfg:
        both = jnp.asarray(velocity_fn(params, jnp.concatenate([x, x]), jnp.concatenate([sig, sig]),
                                       _concat(neg_cond, cond)), jnp.float32)
        neg, pos = both[:b], both[b:]
      else:
        pos = jnp.asarray(velocity_fn(params, x, sig, cond), jnp.float32)
        neg = jnp.asarray(velocity_fn(params, x, sig, neg_cond), jnp.float32)
      u = orthogonal_cfg(pos, neg, x, sigma, guidance, orthogonal)
    if clamp_denoised:
      u = clamp_velocity(u, x, sigma, color_space)
    return u

  return unipc_solve(velocity, noise, plan, trajectory=trajectory)


# ------------------------------------------------------------------ AsymFLUX.2 text-to-image glue


@functools.lru_cache(maxsize=None)
def asymflux2_velocity_fn(model, sigma_min: float) -> VelocityFn:
  """The AsymFLUX.2 velocity as a ``velocity_fn`` (cached per model, so jit reuses its compile):
  ``params`` = (model params, basis, scale), ``cond`` = prompt embeddings (B, L, D)."""
  def fn(params, x, sigma, cond):
    p, basis, scale = params
    return asymflux2.asymflux2_apply(model, p, x, sigma, cond, basis, scale=scale, sigma_min=sigma_min)
  return fn


def generate_t2i(model, params, basis, scale, prompt_embeds, empty_embeds, *, sample_config, seed: int,
                 height: int, width: int, start: int = 0, color_space: str = "oklab") -> np.ndarray:
  """uint8 RGB images (B, H, W, 3) of an AsymFLUX.2 for prompt embeddings (B, L, D).

  Noise of image i is ``normal(fold_in(key(seed), start + i))``; CFG against ``empty_embeds``
  (L, D) when ``sample_config.guidance > 1`` (the pipeline's rule), orthogonal weight
  ``sample_config.orthogonal``, ``num_steps`` UniPC steps, shift ``sample_config.shift`` (0 = the
  dynamic shift of H x W), the denoised clamp when ``sample_config.clamp_denoised``, recovery clamp
  ``sample_config.sigma_min``.
  """
  s = sample_config
  b = prompt_embeds.shape[0]
  channels = model.config.in_channels // asymflux2.patch_size_of(model, 3) ** 2
  key = jax.random.key(seed)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (height, width, channels)))(
      jnp.arange(start, start + b))
  neg = None
  if s.guidance > 1:
    neg = jnp.broadcast_to(jnp.asarray(empty_embeds), (b, *np.shape(empty_embeds)))
  x = sample_t2i(asymflux2_velocity_fn(model, float(s.sigma_min)), (params, basis, scale), noise,
                 jnp.asarray(prompt_embeds), neg, jnp.float32(s.guidance), jnp.float32(s.orthogonal),
                 num_steps=int(s.num_steps), shift=float(s.shift) if s.shift else None,
                 clamp_denoised=bool(s.clamp_denoised), color_space=color_space)
  images = np.asarray(jnp.clip(colorspace.decode(x, color_space), -1.0, 1.0))
  if not np.isfinite(images).all():
    raise FloatingPointError("non-finite text-to-image samples.")
  return image_io.to_uint8(images)
