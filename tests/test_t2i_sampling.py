"""AsymFLUX.2 klein T2I sampler: parity with the reference FlowAdapter(UniPC) pipeline loop
(tests/fixtures/unipc_flow.*, made by tests/make_unipc_fixture.py), convergence on the exact
Gaussian flow, the dynamic shift, orthogonal guidance and the denoised clamp."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import colorspace
from asymflow_jax import t2i_sampling as ts


def gaussian_velocity(params, x, sigma, cond):
  """Exact E[eps - x0 | x_sigma] for x0 ~ N(cond, params^2) elementwise (as in the fixture script)."""
  s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - s) ** 2 * params ** 2 + s ** 2
  x0 = cond + (1 - s) * params ** 2 / var * (x - (1 - s) * cond)
  return (x - x0) / s


@pytest.fixture(scope="module")
def ref(fixtures_dir):
  meta = json.loads((fixtures_dir / "unipc_flow.json").read_text())
  with np.load(fixtures_dir / "unipc_flow.npz") as f:
    return meta, {k: f[k] for k in f.files}


def _run_case(arrays, name, case, **overrides):
  kw = dict(num_steps=case["num_steps"], shift=case["shift"], clamp_denoised=case["clamp"] is not None,
            color_space=case["clamp"] or "rgb", trajectory=True)
  kw.update(overrides)
  neg = arrays[f"{name}/mu_neg"] if case["guidance"] > 1 else None
  return ts.sample_t2i(gaussian_velocity, jnp.float32(case["std"]), arrays[f"{name}/noise"], arrays[f"{name}/mu"], neg,
                       case["guidance"], case["orthogonal"], **kw)


# ------------------------------------------------------------------------------ (a) parity


def test_sigma_schedules_match_flow_adapter_bitwise(ref):
  meta, arrays = ref
  for name, s in meta["schedules"].items():
    shift = s["shift"] if s["shift"] is not None else ts.image_shift(s["height"], s["width"])
    sig = ts.flow_sigmas(s["num_steps"], shift)
    assert sig.dtype == np.float32 and sig.shape == (s["num_steps"] + 1,) and sig[-1] == 0
    np.testing.assert_array_equal(sig, arrays[f"sched/{name}/sigmas"], err_msg=name)
    np.testing.assert_array_equal(ts.solver_sigmas(sig), arrays[f"sched/{name}/solver_sigmas"], err_msg=name)
    t = arrays[f"sched/{name}/timesteps"]
    np.testing.assert_array_equal(sig[:-1] * np.float32(1000), t, err_msg=name)
    np.testing.assert_array_equal(ts.model_sigmas(sig), t / np.float32(1000), err_msg=name)


def test_trajectories_match_the_reference_pipeline_loop(ref):
  meta, arrays = ref
  for name, case in meta["cases"].items():
    final, traj = _run_case(arrays, name, case)
    want = arrays[f"{name}/trajectory"]
    assert traj.shape == want.shape and traj.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(traj), want, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))


def test_two_calls_cfg_matches_the_doubled_batch(ref):
  meta, arrays = ref
  name = "klein_oklab_clamp"
  final, _ = _run_case(arrays, name, meta["cases"][name], batch_cfg=False)
  np.testing.assert_allclose(np.asarray(final), arrays[f"{name}/trajectory"][-1], rtol=1e-5, atol=1e-5)


def test_solver_orders_and_last_step():
  np.testing.assert_array_equal(ts.predictor_orders(1), [1])
  np.testing.assert_array_equal(ts.predictor_orders(2), [1, 1])
  np.testing.assert_array_equal(ts.predictor_orders(5), [1, 2, 2, 2, 1])
  plan = ts.unipc_plan(6, 17.0)
  assert plan.solver_sigma[0] == np.float32(1 - 1e-4) and plan.model_sigma[0] == 1.0
  assert (plan.pred_ratio[-1], plan.pred_x0[-1], plan.pred_d1[-1]) == (0, 1, 0)   # x_N = m_{N-1}
  assert (plan.corr_ratio[0], plan.corr_x0[0], plan.corr_d1[0], plan.corr_dt[0]) == (1, 0, 0, 0)
  assert plan.pred_d1[0] == 0 and plan.corr_d1[1] == 0 and np.all(plan.corr_d1[2:] != 0)


# --------------------------------------------------------------- (b) exact Gaussian flow


def test_converges_to_the_exact_gaussian_ode_endpoint_at_second_order():
  """x0 ~ N(M, S^2 I), x_sigma = (1 - sigma) x0 + sigma eps. Conditioning gives E[x0 | x] = M + (1 - sigma)
  S^2 / v (x - (1 - sigma) M), v = (1 - sigma)^2 S^2 + sigma^2, and the probability-flow ODE keeps the
  standardised value, so x(sigma) = (1 - sigma) M + sqrt(v) z and x(0) = M + S z from x(1) = z.

  The endpoint error falls ~4x per doubling (order 2: the last step returns the x0 prediction at the
  last nonzero sigma ~ 1/N). It levels off near 1e-4 beyond ~100 steps because FlowAdapter starts the
  solver at sigma 1 - 1e-4 while the model is queried at sigma 1."""
  m, s = 0.7, 1.0
  z = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
  exact = m + s * z.astype(np.float64)
  mean = jnp.full(z.shape, m, jnp.float32)
  errors = []
  for n in (8, 16, 32, 64):
    x = ts.sample_t2i(gaussian_velocity, jnp.float32(s), z, mean, num_steps=n, shift=1.0, clamp_denoised=False)
    errors.append(np.sqrt(np.mean((np.asarray(x, np.float64) - exact) ** 2)))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all(ratios > 2.8), (errors, ratios)
  order = np.log2(errors[0] / errors[-1]) / 3
  assert 1.7 < order < 2.6, (errors, order)
  assert errors[-1] < 1e-3, errors


# ------------------------------------------------------------------------- (c) dynamic shift


def test_dynamic_shift_values(ref):
  meta, _ = ref
  assert ts.image_shift(1024, 1024) == 17.0
  assert ts.image_shift(2048, 2048) == pytest.approx(34.0, rel=1e-14)
  assert ts.image_shift(1280, 960) == pytest.approx(17 * np.sqrt(1280 * 960) / 1024, rel=1e-14)
  for d in meta["dynamic_shift"]:   # the reference's float64 values, exactly
    assert ts.dynamic_shift(d["seq_len"]) == d["shift"], d
    assert ts.image_shift(d["height"], d["width"]) == d["shift"], d
  assert ts.seq_len_of((2, 6, 8, 3)) == 48   # H W pixels of a channels-last state


# ---------------------------------------------------------------------- (d) orthogonal guidance


def _cfg_numpy(pos, neg, x, sigma, g, w):
  pos, neg, x = (np.asarray(a, np.float64) for a in (pos, neg, x))
  g = np.asarray(g, np.float64).reshape((-1,) + (1,) * (pos.ndim - 1))
  bias = (pos - neg) * (g - 1)
  d = x - sigma * pos
  axes = tuple(range(1, pos.ndim))
  coef = (bias * d).mean(axes, keepdims=True) / np.maximum((d * d).mean(axes, keepdims=True), 1e-6)
  return pos + bias - w * coef * d


def test_orthogonal_guidance_against_numpy():
  rng = np.random.default_rng(1)
  pos, neg, x = (jnp.asarray(rng.standard_normal((3, 4, 5, 3)), jnp.float32) for _ in range(3))
  sigma = jnp.float32(0.37)
  cfg = jax.jit(ts.orthogonal_cfg)
  for g, w in ((4.0, 1.0), (2.5, 0.5), (4.0, 0.0), (jnp.array([1.0, 3.0, 6.0]), 1.0)):
    got = cfg(pos, neg, x, sigma, g, w)
    np.testing.assert_allclose(np.asarray(got), _cfg_numpy(pos, neg, x, 0.37, g, w), rtol=2e-5, atol=2e-5)
  # orthogonal = 0 is plain CFG; orthogonal = 1 leaves a bias orthogonal (per sample) to x0 = x - sigma pos
  p, n = np.asarray(pos), np.asarray(neg)
  np.testing.assert_array_equal(np.asarray(cfg(pos, neg, x, sigma, 4.0, 0.0)), p + (p - n) * np.float32(3))
  guided = np.asarray(cfg(pos, neg, x, sigma, 4.0, 1.0))
  bias = guided.astype(np.float64) - p
  d = np.asarray(x, np.float64) - 0.37 * p
  assert np.abs((bias * d).mean((1, 2, 3))).max() < 1e-5 * np.abs(bias).mean()
  # per-sample: changing sample 2 leaves samples 0 and 1 alone
  other = np.asarray(cfg(pos, neg.at[2].multiply(5.0), x, sigma, 4.0, 1.0))
  np.testing.assert_array_equal(other[:2], guided[:2])


# ---------------------------------------------------------------------------- (e) the clamp


def test_clamp_velocity_rgb_clips_the_denoised_image():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  x0 = (1.5 * rng.standard_normal((2, 4, 4, 3))).astype(np.float32)
  sigma = np.float32(0.6)
  u = (x - x0) / sigma
  clamp = jax.jit(ts.clamp_velocity, static_argnames="color_space")
  got = np.asarray(clamp(u, x, sigma, "rgb"))
  np.testing.assert_allclose(x - sigma * got, np.clip(x0, -1, 1), atol=2e-6)
  inside = np.abs(x0) <= 1
  assert 0 < inside.mean() < 1
  np.testing.assert_allclose(got[inside], u[inside], rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(clamp(u, x, np.float32(0.0), "rgb"))))   # sigma floored at 1e-4


def test_clamp_velocity_oklab_projects_into_gamut():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  sigma = np.float32(0.5)
  clamp = jax.jit(ts.clamp_velocity)   # colour space "oklab", the pipeline's encoder
  project = jax.jit(lambda z: colorspace.encode(colorspace.decode(z, "oklab"), "oklab"))
  # an in-gamut x0 (an encoded RGB image) is left alone
  x0_in = np.asarray(jax.jit(colorspace.encode, static_argnums=1)(
      rng.uniform(-0.95, 0.95, (2, 4, 4, 3)).astype(np.float32), "oklab"))
  u_in = (x - x0_in) / sigma
  np.testing.assert_allclose(np.asarray(clamp(u_in, x, sigma)), u_in, rtol=1e-4, atol=1e-4)
  # an out-of-gamut x0 is moved onto encode(decode(x0)) and the clamp is idempotent
  x0_out = (2.0 * rng.standard_normal((2, 4, 4, 3))).astype(np.float32)
  u_out = (x - x0_out) / sigma
  once = np.asarray(clamp(u_out, x, sigma))
  np.testing.assert_allclose(x - sigma * once, np.asarray(project(x0_out)), rtol=1e-5, atol=1e-5)
  assert np.abs(once - u_out).max() > 0.1
  np.testing.assert_allclose(np.asarray(clamp(once, x, sigma)), once, rtol=1e-4, atol=1e-4)


def test_clamp_keeps_the_samples_in_range_and_is_active_in_the_fixture(ref):
  meta, arrays = ref
  name = "guided_rgb_clamp"
  case = meta["cases"][name]
  clamped, _ = _run_case(arrays, name, case)
  free, _ = _run_case(arrays, name, case, clamp_denoised=False)
  assert np.abs(np.asarray(clamped)).max() <= 1 + 1e-5
  assert np.asarray(free).max() > 1.2
  # the reference trajectories were made with the clamp on: without it they would differ
  for name in ("guided_rgb_clamp", "klein_oklab_clamp"):
    free, _ = _run_case(arrays, name, meta["cases"][name], clamp_denoised=False)
    assert np.abs(np.asarray(free) - arrays[f"{name}/trajectory"][-1]).max() > 0.1, name


def test_guidance_is_traced_not_static(ref):
  meta, arrays = ref
  name = "cfg_plain"
  case = dict(meta["cases"][name])
  _run_case(arrays, name, case)
  size = ts.sample_t2i._cache_size()
  _run_case(arrays, name, {**case, "guidance": 2.0, "orthogonal": 0.3})
  assert ts.sample_t2i._cache_size() == size
