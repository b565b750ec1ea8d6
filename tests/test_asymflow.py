"""Tests of the AsymFlow core math against independent float64 numpy derivations and the reference."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

import jax
import jax.numpy as jnp

from asymflow_jax import asymflow as af


def _orthonormal(d, r, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, max(r, 1))))
  return q[:, :r].astype(np.float32)


def _inputs(b=4, n=6, d=12, r=3, seed=0, sigma=None):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (b, n, d)).astype(np.float32)
  eps = rng.standard_normal((b, n, d)).astype(np.float32)
  if sigma is None:
    sigma = rng.uniform(0, 1, b)
  sigma = np.asarray(sigma, np.float32)
  return x0, eps, _orthonormal(d, r, seed + 1), sigma


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _np_recover(u_a, x_t, u, sigma, s, clamp):
  """Spec section 2 written directly in float64 with an explicit D x D projector."""
  u_a, x_t, u = (np.asarray(a, np.float64) for a in (u_a, x_t, u))
  sigma = np.asarray(sigma, np.float64)[:, None, None]
  pi = u @ u.T
  eye = np.eye(pi.shape[0])
  k = 1.0 / (s + (1 - s) * sigma)
  sc = np.maximum(sigma, clamp)
  return s * k * (u_a @ pi) + (1 - s * k) / sc * (x_t @ pi) + (x_t + s * u_a) @ (eye - pi) / sc


# ------------------------------------------------------------------------------------ patchify


def test_patchify_order_matches_explicit_indexing():
  rng = np.random.default_rng(0)
  img = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
  p = 4
  tok = np.asarray(af.patchify(img, p))
  tok_cf = np.asarray(af.patchify(img, p, channel_first=True))
  assert tok.shape == (2, 6, 48)
  gw = 12 // p
  for b in range(2):
    for i in range(2):
      for j in range(3):
        for py in range(p):
          for px in range(p):
            for c in range(3):
              want = img[b, i * p + py, j * p + px, c]
              assert tok[b, i * gw + j, (py * p + px) * 3 + c] == want
              assert tok_cf[b, i * gw + j, (c * p + py) * p + px] == want


@given(b=st.integers(1, 3), gh=st.integers(1, 4), gw=st.integers(1, 4), p=st.sampled_from([1, 2, 4]),
       c=st.integers(1, 4), channel_first=st.booleans())
def test_patchify_round_trip(b, gh, gw, p, c, channel_first):
  img = np.random.default_rng(b * 100 + gh).standard_normal((b, gh * p, gw * p, c)).astype(np.float32)
  tok = af.patchify(img, p, channel_first=channel_first)
  assert tok.shape == (b, gh * gw, p * p * c)
  back = af.unpatchify(tok, p, gh * p, gw * p, channel_first=channel_first)
  np.testing.assert_array_equal(np.asarray(back), img)


def test_patchify_rejects_indivisible_size():
  with pytest.raises(ValueError, match=r"H=30, W=32 is not divisible by the patch size p=4"):
    af.patchify(jnp.zeros((1, 30, 32, 3)), 4)
  with pytest.raises(ValueError, match=r"NHWC"):
    af.patchify(jnp.zeros((30, 32, 3)), 2)
  for bad_p in (0, 2.0):
    with pytest.raises(ValueError, match=rf"patch size p must be a positive integer, got {bad_p}"):
      af.patchify(jnp.zeros((1, 8, 8, 3)), bad_p)
  for bad_p in (0, 2.0):
    with pytest.raises(ValueError, match=rf"patch size p must be a positive integer, got {bad_p}"):
      af.unpatchify(jnp.zeros((1, 4, 48)), bad_p, 8, 8)
  with pytest.raises(ValueError, match=r"image size H=8, W=6 is not divisible by the patch size p=4"):
    af.unpatchify(jnp.zeros((1, 2, 48)), 4, 8, 6)
  with pytest.raises(ValueError, match=r"do not tile a 8x8 image with patch 4: expected N=4 and D a multiple of 16"):
    af.unpatchify(jnp.zeros((1, 4, 20)), 4, 8, 8)     # the right N, but D = 20 is not p^2 C
  with pytest.raises(ValueError, match=r"do not tile a 8x12 image with patch 4: expected N=6 and D a multiple of 16\."):
    af.unpatchify(jnp.zeros((1, 5, 48)), 4, 8, 12)


# --------------------------------------------------------------------------------- projections


def test_project_matches_dense_projector():
  x0, _, u, _ = _inputs(d=20, r=5)
  pi = u.astype(np.float64) @ u.T.astype(np.float64)
  want = x0.astype(np.float64) @ pi
  assert _rel(af.project(x0, u), want) < 1e-6
  assert _rel(af.complement(x0, u), x0 - want) < 1e-6
  # the projector is idempotent and the two parts are orthogonal
  p = af.project(x0, u)
  assert _rel(af.project(p, u), p) < 1e-6
  assert abs(float(jnp.sum(p * af.complement(x0, u)))) < 1e-4 * float(jnp.sum(x0 * x0))


def test_asymmetric_target_formula():
  x0, eps, u, _ = _inputs()
  for s in (1.0, 0.8):
    want = np.asarray(eps, np.float64) @ (u @ u.T).astype(np.float64) - x0.astype(np.float64) / s
    assert _rel(af.asymmetric_target(x0, eps, u, scale=s), want) < 1e-6


def test_calibrate_formula():
  sigma = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
  k, t = af.calibrate(jnp.asarray(sigma), 0.8)
  want_k = 1.0 / (0.8 + 0.2 * sigma.astype(np.float64))
  np.testing.assert_allclose(np.asarray(k), want_k, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(t), sigma * want_k, rtol=1e-6)
  for k1, t1 in (af.calibrate(jnp.asarray(sigma), 1.0), af.calibrate(jnp.asarray(sigma))):   # s = 1: the default
    np.testing.assert_array_equal(np.asarray(k1), np.ones(4))
    np.testing.assert_array_equal(np.asarray(t1), sigma)
  # the calibrated level kσ is the latent-space noise level: k Uᵀx_σ = (1 − kσ) z + kσ ε with z = Uᵀx0/s
  s, x0, eps = 0.8, 0.7, -1.3
  for sg in (0.1, 0.6):
    kk = 1 / (s + (1 - s) * sg)
    assert np.isclose(kk * ((1 - sg) * x0 + sg * eps), (1 - kk * sg) * x0 / s + kk * sg * eps)


# ------------------------------------------------------------------------------------ recovery


@pytest.mark.parametrize("s", [1.0, 0.8])
@pytest.mark.parametrize("clamp", [af.TRAIN_SIGMA_MIN, af.EVAL_SIGMA_MIN])
def test_recover_velocity_matches_spec_formula(s, clamp):
  x0, eps, u, _ = _inputs(b=6, d=16, r=4, sigma=[1.0, 0.88, 0.5, 0.1, 0.03, 1e-4])
  rng = np.random.default_rng(5)
  u_a = rng.standard_normal(x0.shape).astype(np.float32)
  sigma = np.array([1.0, 0.88, 0.5, 0.1, 0.03, 1e-4], np.float32)
  x_t = np.asarray(af.add_noise(x0, eps, sigma))
  got = af.recover_velocity(u_a, x_t, u, sigma, scale=s, sigma_min=clamp)
  want = _np_recover(u_a, x_t, u, sigma, s, clamp)
  for i in range(6):  # per sample: values at tiny sigma are ~1e4 larger than at sigma = 1
    assert _rel(got[i], want[i]) < 1e-6, (i, sigma[i])


@pytest.mark.parametrize("s", [1.0, 0.8, 1.7])
def test_recovery_of_exact_target_is_the_velocity(s):
  x0, eps, u, _ = _inputs(b=8, d=48, r=8, seed=3)
  sigma = np.array([1.0, 0.9, 0.5, 0.2, 0.08, 0.04, 0.01, 1e-3], np.float32)
  clamp = 1e-3
  x_t = af.add_noise(x0, eps, sigma)
  u_a = af.asymmetric_target(x0, eps, u, scale=s)
  got = af.recover_velocity(u_a, x_t, u, sigma, scale=s, sigma_min=clamp)
  want = eps.astype(np.float64) - x0
  for i in range(8):
    # float32 round-off amplified by 1/sigma in the complement division
    tol = 8 * np.finfo(np.float32).eps * (1 + 1 / sigma[i]) * np.max(np.abs(want[i]))
    assert np.max(np.abs(np.asarray(got[i], np.float64) - want[i])) < tol, (i, sigma[i])


def test_clamp_applies_only_to_the_divisions():
  # below the clamp the oracle is no longer exact, and the result equals the formula with sigma_c
  x0, eps, u, _ = _inputs(b=2, d=12, r=3)
  sigma = np.array([1e-3, 1e-3], np.float32)
  x_t = af.add_noise(x0, eps, sigma)
  u_a = af.asymmetric_target(x0, eps, u, scale=0.8)
  got = af.recover_velocity(u_a, x_t, u, sigma, scale=0.8, sigma_min=0.04)
  # x_t + s u_a cancels to O(sigma) here: float32 round-off of O(1) terms, divided by sigma_c = 0.04
  assert _rel(got, _np_recover(u_a, x_t, u, sigma, 0.8, 0.04)) < 1e-5
  assert _rel(got, eps - x0) > 1e-2


def test_rank_zero_is_jit_x0_prediction():
  x0, eps, _, sigma = _inputs(b=4, d=12, r=0, sigma=[1.0, 0.6, 0.2, 0.01])
  u0 = np.zeros((12, 0), np.float32)
  # the target is -x0 (no noise part): the network predicts the (negated) clean image
  np.testing.assert_array_equal(np.asarray(af.asymmetric_target(x0, eps, u0)), -x0)
  x_t = af.add_noise(x0, eps, sigma)
  x0_hat = x0 + 0.1 * eps  # any prediction
  got = af.recover_velocity(-x0_hat, x_t, u0, sigma, sigma_min=0.04)
  want = af.velocity_from_x0(x_t, x0_hat, sigma, sigma_min=0.04)
  assert _rel(got, want) < 1e-6
  want_np = (np.asarray(x_t, np.float64) - x0_hat) / np.maximum(sigma, 0.04)[:, None, None]
  assert _rel(got, want_np) < 1e-6


def test_full_rank_is_velocity_prediction():
  x0, eps, _, sigma = _inputs(b=4, d=12, r=12)
  full = _orthonormal(12, 12, 9)
  target = af.asymmetric_target(x0, eps, full)
  assert _rel(target, eps - x0.astype(np.float64)) < 1e-6
  x_t = af.add_noise(x0, eps, sigma)
  u_hat = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
  got = af.recover_velocity(u_hat, x_t, full, sigma, sigma_min=1e-6)
  assert _rel(got, u_hat) < 1e-5  # the complement is empty: the output is the velocity itself


def test_recovery_matches_reference_fixture(fixtures_dir):
  f = np.load(fixtures_dir / "jit_tiny.npz")
  basis = f["sd/proj_buffer"]
  x_t = af.patchify(f["in/x_t"].transpose(0, 2, 3, 1), 4)
  sigma = f["in/timesteps"]
  cases = [("eval", "1", af.EVAL_SIGMA_MIN), ("train", "1", af.TRAIN_SIGMA_MIN), ("eval", "0.8", af.EVAL_SIGMA_MIN)]
  for mode, s, clamp in cases:
    u = af.recover_velocity(f[f"out/u_a_packed_{mode}_s{s}"], x_t, basis, sigma, scale=float(s), sigma_min=clamp)
    ref = f[f"out/{mode}_s{s}"].transpose(0, 2, 3, 1)
    assert _rel(af.unpatchify(u, 4, 32, 32), ref) < 1e-6, (mode, s)


def test_recover_velocity_jits_and_upcasts():
  x0, eps, u, sigma = _inputs()
  fn = jax.jit(af.recover_velocity, static_argnames="sigma_min")
  eager = af.recover_velocity(x0, eps, u, sigma, scale=0.9, sigma_min=0.04)
  jitted = fn(x0, eps, u, sigma, scale=jnp.float32(0.9), sigma_min=0.04)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
  out = af.recover_velocity(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(eps, jnp.bfloat16), u, sigma, sigma_min=0.04)
  assert out.dtype == jnp.float32


@given(d=st.integers(1, 24), data=st.data(), b=st.integers(1, 3), n=st.integers(1, 5),
       s=st.sampled_from([1.0, 0.5, 2.0]))
def test_property_recovery_identity(d, data, b, n, s):
  r = data.draw(st.integers(0, d))
  sigma = np.asarray(data.draw(st.lists(st.floats(0.05, 1.0), min_size=b, max_size=b)), np.float32)
  x0, eps, u, _ = _inputs(b=b, n=n, d=d, r=r, seed=d * 7 + r)
  x_t = af.add_noise(x0, eps, sigma)
  got = af.recover_velocity(af.asymmetric_target(x0, eps, u, scale=s), x_t, u, sigma, scale=s, sigma_min=0.05)
  assert got.shape == (b, n, d)
  np.testing.assert_allclose(np.asarray(got), eps - x0, atol=1e-4 * max(1.0, s))


# --------------------------------------------------------------------------------- conversions


def test_conversions_are_consistent():
  x0, eps, _, sigma = _inputs(sigma=[0.9, 0.5, 0.3, 0.1])
  x_t = af.add_noise(x0, eps, sigma)
  np.testing.assert_allclose(np.asarray(x_t), (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps, rtol=1e-6)
  u = af.velocity(x0, eps)
  np.testing.assert_array_equal(np.asarray(u), eps - x0)
  np.testing.assert_allclose(np.asarray(af.x0_from_velocity(x_t, u, sigma)), x0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(af.noise_from_velocity(x_t, u, sigma)), eps, atol=1e-5)
  np.testing.assert_allclose(np.asarray(af.velocity_from_x0(x_t, x0, sigma, sigma_min=1e-6)), u, atol=1e-4)
  np.testing.assert_allclose(np.asarray(af.velocity_from_noise(x_t, eps, sigma)), u, atol=1e-4)
  # at sigma = 1 the epsilon-prediction conversion divides by 1 - min(sigma, 1 - 1e-6) = 1e-6, not by 0
  # (1.013e-6 in float32, whose spacing just below 1 is 6e-8)
  one = jnp.ones_like(sigma)
  np.testing.assert_allclose(np.asarray(af.velocity_from_noise(eps, 0.5 * eps, one)), -0.5 * eps / 1e-6, rtol=0.02)


# -------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
  x0, eps, u, sigma = _inputs(d=12, r=3)
  with pytest.raises(ValueError, match=r"rank r=13 exceeds the patch dimension D=12"):
    af.project(x0, np.zeros((12, 13), np.float32))
  with pytest.raises(ValueError, match=r"not orthonormal"):
    af.asymmetric_target(x0, eps, 2 * u)
  with pytest.raises(ValueError, match=r"basis has 10 rows but tokens have dimension D=12"):
    af.asymmetric_target(x0, eps, _orthonormal(10, 3, 0))
  with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\], got values \[1.5, -0.25\]\."):   # the ends are valid
    af.recover_velocity(x0, eps, u, np.array([0.0, 1.0, 1.5, -0.25], np.float32), sigma_min=0.04)
  with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\], got values \[2.0, 3.0, 4.0, 5.0\]\."):
    af.check_sigma(np.array([2, 3, 4, 5, 6], np.float32))   # the first four offenders
  with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\], got values \[-0.25\]\."):
    af.recover_velocity(x0, eps, u, np.array([0.5, -0.25, 0.5, 0.5], np.float32), sigma_min=0.04)
  with pytest.raises(ValueError, match=r"not orthonormal: max \|U\^T U - I\| = 3 > 0.0001"):   # rank 1 is checked too
    af.project(x0, 2 * u[:, :1])
  with pytest.raises(ValueError, match=r"= 0.0201 > 0.0001"):   # the default tolerance 1e-4
    af.check_basis(1.01 * u)
  edge = np.array([[1.5], [0.0]], np.float32)       # max |U^T U - I| = 1.25 exactly: the bound is inclusive
  assert af.check_basis(edge, atol=1.25) is edge
  with pytest.raises(ValueError, match=r"= 1.25 > 1.2"):
    af.check_basis(edge, atol=1.2)
  with pytest.raises(ValueError, match=r"sigma must have shape \(4,\)"):
    af.recover_velocity(x0, eps, u, np.float32(0.5) * np.ones((4, 1), np.float32), sigma_min=0.04)
  with pytest.raises(ValueError, match=r"same shape"):
    af.recover_velocity(x0, eps[:, :3], u, sigma, sigma_min=0.04)
  with pytest.raises(ValueError, match=r"same dtype"):
    af.recover_velocity(x0, eps.astype(np.float16), u, sigma, sigma_min=0.04)
  for bad in (-1.0, -0.5, 0.0, float("inf")):
    with pytest.raises(ValueError, match=rf"scale must be a finite positive number, got {bad}"):
      af.asymmetric_target(x0, eps, u, scale=bad)
  with pytest.raises(ValueError, match=r"sigma_min must be positive"):
    af.recover_velocity(x0, eps, u, sigma, sigma_min=0.0)
  with pytest.raises(ValueError, match=r"floating-point"):
    af.project(x0.astype(np.int32), u)


def test_shape_errors_raise_at_trace_time_under_jit():
  x0, eps, u, sigma = _inputs(d=12, r=3)
  fn = jax.jit(lambda a, b, s: af.recover_velocity(a, b, u, s, sigma_min=0.04))
  with pytest.raises(ValueError, match=r"same shape"):
    fn(x0, eps[:2], sigma)
