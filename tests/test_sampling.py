"""Samplers against the exact Gaussian flow, CFG interval semantics, compile-once, determinism."""

import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import sampling

from tests.conftest import REPO, subprocess_env
M, S = 0.7, 0.4  # data x0 ~ N(M, S^2) per dimension


def gaussian_velocity(x, sigma, labels):
  """Exact E[eps - x0 | x_sigma] for x0 ~ N(M, S^2), eps ~ N(0, 1) (derived by Gaussian conditioning)."""
  del labels
  s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - s) ** 2 * S ** 2 + s ** 2
  centred = x - (1 - s) * M
  e_x0 = M + (1 - s) * S ** 2 / var * centred
  e_eps = s / var * centred
  return e_eps - e_x0


def _exact_endpoint(z):
  # the ODE transports x(sigma) = (1 - sigma) M + sqrt(var(sigma)) z, so x(0) = M + S z
  return M + S * z


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_gaussian_data(method, order):
  z = jax.random.normal(jax.random.key(0), (64, 8))
  labels = jnp.zeros((64,), jnp.int32)
  errors = []
  for n in (8, 16, 32):
    x = sampling.sample(gaussian_velocity, z, labels, num_steps=n, method=method, cfg=False)
    errors.append(float(jnp.max(jnp.abs(x - _exact_endpoint(z)))))
  rates = [np.log2(errors[i] / errors[i + 1]) for i in range(2)]
  assert all(abs(r - order) < 0.2 for r in rates), (errors, rates)  # error ~ C / N^order


def test_sigma_grid_and_evaluation_count():
  grid = sampling.sigma_grid(50)
  assert grid.dtype == np.float32 and grid.shape == (51,) and grid[0] == 1.0 and grid[-1] == 0.0
  np.testing.assert_allclose(grid[:3], [1.0, 0.98, 0.96], rtol=1e-6)
  # the ImageNet interval [0, 0.88]: the first six sigmas (1 ... 0.90) are unguided, 0.88 onwards guided
  assert list(grid[:7] <= np.float32(0.88)) == [False] * 6 + [True]
  shifted = sampling.sigma_grid(4, shift=3.0)
  raw = np.array([1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose(shifted[:4], 3 * raw / (1 + 2 * raw), rtol=1e-6)
  # count evaluations and record their sigmas at run time through a host callback
  seen = []

  def vel(x, sigma, labels):
    jax.debug.callback(lambda s: seen.append(float(s[0])), sigma, ordered=True)
    return jnp.zeros_like(x)
  g = sampling.sigma_grid(5)
  # Heun: predictor at s_i and corrector at s_{i+1} for i < N - 1, then a final Euler step from s_{N-1}
  want = {"heun": [g[0], g[1], g[1], g[2], g[2], g[3], g[3], g[4], g[4]], "euler": list(g[:5])}
  for method, n in (("heun", 5), ("euler", 5)):
    seen.clear()
    jax.block_until_ready(sampling.sample(vel, jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), num_steps=n,
                                          method=method, cfg=False))
    jax.effects_barrier()
    assert len(seen) == sampling.num_evaluations(n, method) == (9 if method == "heun" else 5)
    np.testing.assert_allclose(seen, want[method], rtol=0, atol=1e-7)


def test_cfg_interval_is_inclusive_in_sigma():
  def vel(x, sigma, labels):  # conditional velocity 1, unconditional 0
    return jnp.where((labels == 10)[:, None], 0.0, 1.0) + 0 * x
  x, labels = jnp.zeros((3, 2)), jnp.array([1, 2, 3])
  g = lambda s: sampling.guided_velocity(vel, x, jnp.float32(s), labels, null_label=10, guidance=2.3,
                                         interval=(0.0, jnp.float32(0.88)))
  np.testing.assert_allclose(np.asarray(g(0.88)), 2.3)      # inclusive upper bound
  np.testing.assert_allclose(np.asarray(g(0.0)), 2.3)       # inclusive lower bound
  np.testing.assert_allclose(np.asarray(g(0.9)), 1.0)       # outside: g = 1 (conditional only)
  np.testing.assert_allclose(np.asarray(g(0.5)), 2.3)


def test_unconditional_half_runs_only_inside_the_interval():
  # a velocity that reports the batch it was called with: 2B where the null-label half runs, else B
  vel = lambda x, sigma, labels: jnp.full(x.shape, x.shape[0], jnp.float32)
  x, labels = jnp.zeros((3, 2)), jnp.array([1, 2, 3])
  g = jax.jit(lambda s, scale, hi: sampling.guided_velocity(vel, x, s, labels, null_label=10, guidance=scale,
                                                             interval=(0.0, hi)))
  np.testing.assert_array_equal(g(0.5, 2.3, 0.88), 6.0)    # inside: 6 + 1.3 (6 - 6)
  np.testing.assert_array_equal(g(0.9, 2.3, 0.88), 3.0)    # outside: the conditional half alone
  np.testing.assert_array_equal(g(0.5, 1.0, 0.88), 3.0)    # guidance 1: nothing to guide
  np.testing.assert_array_equal(g(0.9, 2.3, 1.0), 6.0)     # a new traced interval ...
  assert g._cache_size() == 1                               # ... reuses the one compiled program


def test_orthogonal_guidance_removes_component_along_x0():
  def vel(x, sigma, labels):
    return jnp.where((labels == 10)[:, None], jnp.array([0.0, 0.0]), jnp.array([1.0, 2.0])) + 0 * x
  x = jnp.array([[3.0, 1.0]])
  out = sampling.guided_velocity(vel, x, jnp.float32(0.5), jnp.array([0]), null_label=10, guidance=3.0,
                                 interval=(0.0, 1.0), orthogonal=1.0)
  pos = np.array([1.0, 2.0])
  x0 = np.array([3.0, 1.0]) - 0.5 * pos        # (2.5, 0)
  bias = pos - (pos @ x0) / (x0 @ x0) * x0      # (0, 2)
  np.testing.assert_allclose(np.asarray(out)[0], pos + 2.0 * bias, rtol=1e-6)


def test_heun_cfg_compiles_once_for_different_guidance():
  traces = {"n": 0}

  def vel(x, sigma, labels):
    traces["n"] += 1
    return gaussian_velocity(x, sigma, labels) * (1 + 0.1 * (labels[:, None] == 10))

  @jax.jit
  def run(noise, labels, guidance, hi):
    return sampling.sample(vel, noise, labels, num_steps=50, method="heun", guidance=guidance, interval=(0.0, hi),
                           null_label=10)
  z, y = jnp.ones((2, 4)), jnp.array([1, 2])
  outs = [run(z, y, g, 0.88) for g in (1.0, 2.3, 4.0)]
  assert run._cache_size() == 1
  # traced once: predictor + corrector in the loop body and the final Euler step, each with the
  # guided and the conditional-only branch
  assert traces["n"] == 6
  assert not np.allclose(outs[1], outs[2])


def test_images_do_not_depend_on_device_count(tmp_path):
  """(Host-count invariance: tests/test_multiprocess.py samples a 2-process checkpoint in 1 process.)"""
  from tests.sampling_worker import generate_images  # noqa: PLC0415
  out = tmp_path / "d8.npz"
  proc = subprocess.run([sys.executable, "tests/sampling_worker.py", str(out)], env=subprocess_env(8),
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = np.load(out)
  one = generate_images()   # the same 16 images in this single-device process
  assert jax.device_count() == 1 and int(eight["devices"]) == 8
  assert one.shape == (16, 32, 32, 1) and one.dtype == np.uint8
  np.testing.assert_array_equal(one, eight["images"])
  np.testing.assert_array_equal(one[3:8], eight["odd"])   # 5 images on 8 devices: padded, then cropped
  assert one.std() > 5  # real images, not a constant


def test_asymjit_heun_cfg_compiles_once_across_guidance_values():
  from tests.sampling_worker import perturbed_tiny_model  # noqa: PLC0415
  model, params, basis = perturbed_tiny_model()
  idx = jnp.arange(4)
  run = lambda g: sampling.generate(model, params, basis, 1.0, jax.random.key(0), idx, jnp.float32(g),
                                    (jnp.float32(0.0), jnp.float32(0.88)), num_steps=50, method="heun")
  before = sampling.generate._cache_size()
  images = [np.asarray(run(g)) for g in (1.5, 2.3, 4.0)]
  assert sampling.generate._cache_size() == before + 1
  assert all(im.min() == -1.0 and im.max() == 1.0 for im in images)   # clipped to [-1, 1], both ends reached
  assert np.abs(images[0] - images[2]).max() > 1e-2   # the scale changes the result


def test_sigma_grid_rejects_fewer_than_one_step():
  np.testing.assert_array_equal(sampling.sigma_grid(1), [1.0, 0.0])
  with pytest.raises(ValueError, match=r"num_steps must be >= 1, got 0\."):
    sampling.sigma_grid(0)


def _two_label_velocity(x, sigma, labels):
  # the exact Gaussian velocity for real labels, a different field for the null label 10
  return gaussian_velocity(x, sigma, labels) + jnp.where((labels == 10)[:, None], 0.5, 0.0)


def test_sample_defaults_guidance_1_and_the_whole_sigma_range():
  z, y = jax.random.normal(jax.random.key(1), (3, 4)), jnp.array([1, 2, 3])
  run = lambda **kw: np.asarray(sampling.sample(_two_label_velocity, z, y, num_steps=4, method="heun", **kw))
  # guidance defaults to 1: the conditional velocity alone, as without CFG
  np.testing.assert_allclose(run(null_label=10), run(cfg=False), rtol=0, atol=1e-6)
  # the default interval guides every evaluation: the same as (0, 1) given explicitly, not as (1, 1)
  guided = run(null_label=10, guidance=2.0)
  np.testing.assert_allclose(guided, run(null_label=10, guidance=2.0, interval=(0.0, 1.0)), rtol=0, atol=1e-6)
  assert np.abs(guided - run(null_label=10, guidance=2.0, interval=(1.0, 1.0))).max() > 0.1


def test_labels_shape_error_names_the_batch_size():
  with pytest.raises(ValueError, match=r"labels must have shape \(3,\), got \(2,\)\."):
    sampling.sample(_two_label_velocity, jnp.zeros((3, 5)), jnp.zeros((2,), jnp.int32), num_steps=1, cfg=False)


def test_noise_and_labels_follow_the_global_index():
  key, idx = jax.random.key(3), jnp.array([0, 5, 12, 13])
  noise, labels = sampling.noise_and_labels(key, idx, (2,), 10)
  assert labels.dtype == jnp.int32 and labels.tolist() == [0, 5, 2, 3]
  for row, i in enumerate((0, 5, 12, 13)):
    np.testing.assert_array_equal(noise[row], jax.random.normal(jax.random.fold_in(key, i), (2,)))


def test_orthogonal_guidance_projects_each_sample_on_its_own_x0():
  # two samples of shape (2, 2): the component of the guidance direction along x0_hat is removed per sample
  rng = np.random.default_rng(0)
  x, pos, neg = (rng.standard_normal((2, 2, 2)).astype(np.float32) for _ in range(3))
  # the doubled batch is [x, x] with labels [null, null, 0, 1]
  vel = lambda xx, s, labels: jnp.asarray(np.concatenate([neg, pos]) if xx.shape[0] == 4 else pos) + 0 * xx
  out = sampling.guided_velocity(vel, jnp.asarray(x), jnp.float32(0.5), jnp.array([0, 1]), null_label=10,
                                 guidance=3.0, interval=(0.0, 1.0), orthogonal=1.0)
  for i in range(2):
    x0, bias = (x[i] - 0.5 * pos[i]).ravel(), (pos[i] - neg[i]).ravel()
    want = pos[i].ravel() + 2.0 * (bias - (bias @ x0) / (x0 @ x0) * x0)
    np.testing.assert_allclose(np.asarray(out[i]).ravel(), want, rtol=1e-5, atol=1e-6)


def test_generate_on_mesh_and_from_config_compose_the_sampler_pieces():
  """generate_on_mesh / generate_from_config against the sampler assembled by hand from its parts
  (noise_and_labels, the AsymJiT velocity, sample, a clip to [-1, 1], to_uint8)."""
  from ml_collections import ConfigDict  # noqa: PLC0415
  from asymflow_jax import image_io, sharding  # noqa: PLC0415
  from tests.sampling_worker import perturbed_tiny_model  # noqa: PLC0415
  model, params, basis = perturbed_tiny_model()
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  cfg = model.config
  noise, labels = sampling.noise_and_labels(jax.random.key(7), jnp.arange(3),
                                            (cfg.input_size, cfg.input_size, cfg.in_channels), cfg.num_classes)
  vel = sampling.asymjit_velocity_fn(model, params, basis, 1.0)
  # guidance 0 is the unconditional model (CFG still on); (0, 0.6) guides only the evaluations at sigma = 0.5
  for guidance, interval in ((0.0, (0.0, 1.0)), (2.0, (0.0, 0.6))):
    x = sampling.sample(vel, noise, labels, num_steps=2, method="heun", guidance=guidance, interval=interval,
                        null_label=cfg.num_classes)
    want = image_io.to_uint8(np.clip(np.asarray(x), -1.0, 1.0))
    got = sampling.generate_on_mesh(model, params, basis, 1.0, mesh, 0, 3, seed=7, guidance=guidance,
                                    interval=interval, num_steps=2, method="heun")
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == 255      # the clip is [-1, 1]: both ends are reached
  s = ConfigDict(dict(num_steps=2, method="heun", guidance=2.0, interval=(0.0, 0.6)))
  for batch in (None, 1, 2):
    out = sampling.generate_from_config(model, params, basis, 1.0, mesh, sample_config=s, num=3, seed=7, batch=batch)
    np.testing.assert_array_equal(out, got)
  one = sampling.generate_from_config(model, params, basis, 1.0, mesh, sample_config=s, num=1, seed=7)
  np.testing.assert_array_equal(one, got[:1])   # a single image is a valid request
  with pytest.raises(ValueError, match=r"num=0: expected at least 1 image\."):
    sampling.generate_from_config(model, params, basis, 1.0, mesh, sample_config=s, num=0, seed=7)
  with pytest.raises(ValueError, match=r"batch=0: expected at least 1\."):
    sampling.generate_from_config(model, params, basis, 1.0, mesh, sample_config=s, num=3, seed=7, batch=0)
  for guidance, interval in ((float("nan"), (0.0, 1.0)), (2.0, (0.0, float("inf")))):
    with pytest.raises(ValueError, match=r"must be finite"):
      sampling.generate_on_mesh(model, params, basis, 1.0, mesh, 0, 3, seed=7, guidance=guidance, interval=interval,
                                num_steps=2)


def test_velocity_fn_runs_a_model_with_dropout_in_eval_mode():
  """``asymjit_velocity_fn`` is the inference velocity: a model with dropout (blocks 1-2 of 4)
  runs deterministically, without a dropout key, and gives the eval-mode forward."""
  from asymflow_jax import asymflow as af  # noqa: PLC0415
  from asymflow_jax.models import asymjit  # noqa: PLC0415
  from tests.sampling_worker import perturbed_tiny_model  # noqa: PLC0415
  model, params, basis = perturbed_tiny_model(depth=4, proj_dropout=0.5, attn_dropout=0.5)
  assert model.config.dropout_active(1) and model.config.dropout_active(2) and not model.config.dropout_active(3)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 1)), jnp.float32)
  sigma, labels = jnp.asarray([0.3, 0.9], jnp.float32), jnp.asarray([1, 10], jnp.int32)
  fn = sampling.asymjit_velocity_fn(model, params, basis, 1.0)
  got = np.asarray(fn(x, sigma, labels))
  want = asymjit.asymjit_apply(model, params, x, sigma, labels, basis, sigma_min=af.EVAL_SIGMA_MIN, train=False)
  np.testing.assert_array_equal(got, np.asarray(want))
  train = asymjit.asymjit_apply(model, params, x, sigma, labels, basis, sigma_min=af.EVAL_SIGMA_MIN, train=True,
                                rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(train) - got).max() > 1e-3   # dropout would change it
