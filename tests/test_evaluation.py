"""Evaluation: Fréchet distance, float64 statistics, FID Inception + weights loader, IS,
precision/recall, reference statistics, and the digit classifier / Fréchet Digit Distance."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from flax import traverse_util

from asymflow_jax.evaluation import classifier as clf
from asymflow_jax.evaluation import inception as inc
from asymflow_jax.evaluation import metrics

# ----------------------------------------------------------------------------
# Fréchet distance and statistics.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
  rng = np.random.default_rng(0)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
  assert got == pytest.approx(want, rel=1e-10, abs=1e-10)
  assert want > 1.0


def test_frechet_distance_rotation_invariant_and_methods_agree():
  # Rotating both Gaussians by the same orthogonal Q leaves the distance unchanged.
  rng = np.random.default_rng(1)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  args = (q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
  assert metrics.frechet_distance(*args) == pytest.approx(want, rel=1e-8)
  assert metrics.frechet_distance(*args, method="eigh") == pytest.approx(want, rel=1e-8)


def test_frechet_distance_self_zero_and_shift():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
  mu, sigma = metrics.feature_statistics(x)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
  # Shifting every feature by c adds exactly d * c^2.
  mu2, sigma2 = metrics.feature_statistics(x + 0.5)
  assert metrics.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(32 * 0.25, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="method"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="nope")


def test_running_statistics_float64_uneven_batches():
  rng = np.random.default_rng(3)
  # Large common offset: a naive float32 / sum-of-squares accumulation would lose digits.
  parts = [(rng.normal(size=(n, 5)) + 1e4).astype(np.float32) for n in (1, 7, 33, 2, 50)]
  stats = metrics.RunningStatistics()
  for p in parts:
    stats.update(p)
  mu, sigma = stats.finalize()
  full = np.concatenate(parts).astype(np.float64)
  assert stats.count == 93
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, full.mean(axis=0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(full, rowvar=False), rtol=1e-10, atol=1e-12)
  mu1, sigma1 = metrics.feature_statistics(full)
  np.testing.assert_allclose(sigma1, sigma, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError):
    metrics.RunningStatistics().update(np.zeros((1, 5))).finalize()


# ----------------------------------------------------------------------------
# Inception Score and precision / recall.
# ----------------------------------------------------------------------------


def test_inception_score_uniform_is_one():
  mean, std = metrics.inception_score(np.zeros((40, 1008)), splits=4)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes_is_k():
  # One-hot p(y|x) on K classes used equally often: p(y) uniform on K, KL = log K, IS = K.
  k, reps = 7, 6
  labels = np.tile(np.arange(k) * 13, reps)  # classes spread over the 1008 logits
  logits = np.full((k * reps, 1008), -60.0)
  logits[np.arange(k * reps), labels] = 60.0
  mean, std = metrics.inception_score(logits, splits=2)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Same class for every sample: IS = 1.
  assert metrics.inception_score(logits[::k], splits=1)[0] == pytest.approx(1.0, abs=1e-9)


def test_precision_recall_simple_manifolds():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(200, 4))
  p, r = metrics.precision_recall(real, real.copy(), k=3)
  assert (p, r) == (1.0, 1.0)
  p, r = metrics.precision_recall(real, real + 100.0, k=3)
  assert (p, r) == (0.0, 0.0)
  # Fakes collapsed to a small patch of the real cloud: precise but low recall.
  fake = 0.05 * rng.normal(size=(200, 4))
  p, r = metrics.precision_recall(real, fake, k=3)
  assert p == 1.0 and r < 0.2


# ----------------------------------------------------------------------------
# Reference statistics.
# ----------------------------------------------------------------------------


def _mean_pool_features(images):
  x = metrics.to_model_range(images)
  return x.mean(axis=(1, 2)), x.reshape(x.shape[0], -1)[:, :3]


def test_reference_statistics_mu_sigma_and_arr0(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=4), np.cov(rng.normal(size=(20, 4)), rowvar=False)
  path = tmp_path / "ref.npz"
  metrics.save_reference_statistics(path, mu, sigma)
  mu2, sigma2 = metrics.load_reference_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)

  images = rng.integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)
  img_path = tmp_path / "virtual.npz"
  np.savez(img_path, arr_0=images, arr_1=np.arange(37))
  with pytest.raises(ValueError, match="feature_fn"):
    metrics.load_reference_statistics(img_path)
  mu3, sigma3 = metrics.load_reference_statistics(img_path, _mean_pool_features, batch_size=10)
  feats = (images.astype(np.float64) / 127.5 - 1.0).mean(axis=(1, 2))
  np.testing.assert_allclose(mu3, feats.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma3, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)

  bad = tmp_path / "bad.npz"
  np.savez(bad, something=np.zeros(3))
  with pytest.raises(ValueError, match="arr_0"):
    metrics.load_reference_statistics(bad)


# ----------------------------------------------------------------------------
# FID Inception.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_vars():
  return inc.random_inception_variables(jax.random.PRNGKey(0))


def test_resize_matches_torch_bilinear_formula():
  # torch F.interpolate(bilinear, align_corners=False): src = (dst + .5) * in / out - .5,
  # clamped at 0, linear between floor(src) and the next pixel (clamped at the edge).
  def ref(x, out):
    n = x.shape[0]
    res = np.empty(out)
    for d in range(out):
      src = max((d + 0.5) * n / out - 0.5, 0.0)
      i0 = int(np.floor(src))
      i1 = min(i0 + 1, n - 1)
      res[d] = (1 - (src - i0)) * x[i0] + (src - i0) * x[i1]
    return res
  rng = np.random.default_rng(6)
  for n, out in ((8, 5), (4, 7), (13, 3)):
    col = rng.normal(size=n)
    img = np.broadcast_to(col[:, None], (n, n))[None, :, :, None].astype(np.float32)
    got = np.asarray(inc.resize_bilinear(jnp.asarray(img), out))[0, :, 0, 0]
    np.testing.assert_allclose(got, ref(col, out), atol=1e-5)


def test_fid_pools_count_exclude_pad_and_max():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  avg = np.asarray(inc._avg3(x))[0, :, :, 0]
  assert avg[0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # 4 valid pixels, not /9
  assert avg[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))
  neg = -x  # the E_2 max pool must pad with -inf, not 0
  mx = np.asarray(inc._max3s1(neg))
  assert mx.shape == (1, 4, 4, 1)
  assert mx[0, 0, 0, 0] == 0.0 and mx[0, 3, 3, 0] == -10.0


def test_inception_forward_shapes_299(inception_vars):
  images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (2, 40, 40, 3)), jnp.float32)
  pool, logits = jax.jit(inc.InceptionV3().apply)(inception_vars, images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool)) and np.all(np.asarray(pool) >= 0)  # ReLU + mean
  assert float(jnp.std(pool)) > 1e-3
  assert not np.allclose(pool[0], pool[1])  # different images give different features


def test_make_feature_fn_pads_last_batch():
  apply_fn = lambda v, x: (x.mean(axis=(1, 2)) * v["w"], x[:, 0, 0, :])
  variables = {"w": jnp.float32(2.0)}
  images = np.random.default_rng(11).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
  feats, logits = metrics.make_feature_fn(apply_fn, variables, batch_size=4)(images)
  x = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(feats, 2.0 * x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, x[:, 0, 0, :], rtol=1e-6)


def test_fid_random_inception_self_zero_shifted_positive(inception_vars):
  model = inc.InceptionV3(input_size=75)
  fn = metrics.make_feature_fn(model.apply, inception_vars, batch_size=16)
  rng = np.random.default_rng(8)
  base = rng.uniform(-0.7, 0.7, (16, 32, 32, 3)).astype(np.float32)
  feats, logits = fn(base)
  shifted, _ = fn(np.clip(base + 0.3, -1, 1))
  assert feats.shape == (16, 2048) and logits.shape == (16, 1008)
  mu, sigma = metrics.feature_statistics(feats)
  mu2, sigma2 = metrics.feature_statistics(shifted)
  # 2048-d: the eigh form (seconds) rather than sqrtm (tens of seconds on 2 cores); one BLAS
  # thread, since pytest-xdist workers oversubscribing OpenBLAS makes eigh ~10x slower.
  with threadpoolctl.threadpool_limits(1):
    fid_self = metrics.frechet_distance(mu, sigma, mu, sigma, method="eigh")
    fid_shift = metrics.frechet_distance(mu, sigma, mu2, sigma2, method="eigh")
  assert abs(fid_self) < 1e-6 * np.trace(sigma)
  assert fid_shift > 1e3 * max(abs(fid_self), 1e-9)
  assert fid_shift > 1e-3 * np.trace(sigma)


def _independent_torch_state(variables):
  """flax -> torch names/layouts, written independently of the module under test."""
  out = {}
  for path, v in traverse_util.flatten_dict(variables["params"]).items():
    v = np.asarray(v)
    prefix = ".".join(path[:-1])
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      out[prefix + ".weight"] = v
    elif path[-1] == "scale":
      out[prefix + ".weight"] = v
    else:
      out[prefix + ".bias"] = v
  for path, v in traverse_util.flatten_dict(variables["batch_stats"]).items():
    out[".".join(path[:-1]) + (".running_mean" if path[-1] == "mean" else ".running_var")] = np.asarray(v)
  return out


def test_weights_npz_loader_roundtrip(inception_vars, tmp_path):
  state = _independent_torch_state(inception_vars)
  # Known shapes of the pytorch-fid FID Inception state dict.
  assert len(state) == 472
  assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert state["Mixed_7b.branch3x3dbl_3b.bn.running_var"].shape == (384,)
  assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
  state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0)  # present in torch files; ignored
  path = tmp_path / "inception.npz"
  np.savez(path, **state)
  loaded = inc.load_inception_npz(path)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      loaded, inception_vars)
  assert all(jax.tree.leaves(same)) and len(jax.tree.leaves(same)) == 472
  model = inc.InceptionV3(input_size=75)
  images = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (2, 75, 75, 3)), jnp.float32)
  apply = jax.jit(model.apply)
  p0, l0 = apply(inception_vars, images)
  p1, l1 = apply(loaded, images)
  np.testing.assert_array_equal(np.asarray(p0), np.asarray(p1))
  np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
  # The module's own exporter writes the same file contents.
  exported = inc.inception_state_dict(inception_vars)
  assert set(exported) == set(state) - {"Mixed_5b.branch1x1.bn.num_batches_tracked"}
  assert all(np.array_equal(exported[k], state[k]) for k in exported)


def test_weights_npz_loader_reports_bad_keys(inception_vars, tmp_path):
  state = inc.inception_state_dict(inception_vars)
  del state["Mixed_6c.branch7x7dbl_4.conv.weight"]
  state["AuxLogits.fc.weight"] = np.zeros((3, 3), np.float32)
  state["Conv2d_2a_3x3.bn.running_mean"] = np.zeros(31, np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError) as err:
    inc.load_inception_npz(path)
  msg = str(err.value)
  assert "missing" in msg and "Mixed_6c.branch7x7dbl_4.conv.weight" in msg
  assert "unexpected" in msg and "AuxLogits.fc.weight" in msg
  assert "misshaped" in msg and "Conv2d_2a_3x3.bn.running_mean" in msg
  with pytest.raises(FileNotFoundError):
    inc.load_inception_npz(tmp_path / "absent.npz")


# ----------------------------------------------------------------------------
# Digit classifier and Fréchet Digit Distance.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_variables(digit_classifier):
  """The default classifier (600 steps, seed 0), committed in tests/fixtures (see the conftest fixture)."""
  return clf.load_classifier(digit_classifier)[0]


def test_classifier_accuracy_and_digit_fd(classifier_variables):
  images, labels = clf.embedded_digits()
  assert images.shape == (5000, 32, 32, 1) and images.min() == -1.0 and images.max() == 1.0
  train_idx, held = clf.held_out_split()
  assert len(held) == 500 and not set(train_idx) & set(held)
  acc = clf.accuracy(classifier_variables, images[held], labels[held])
  assert acc > 0.95
  feats, logits = clf.classifier_features(classifier_variables, images[held[:7]])
  assert feats.shape == (7, clf.FEATURE_DIM) and logits.shape == (7, 10)

  real = clf.digit_fd(images[held], variables=classifier_variables)
  noise = np.random.default_rng(10).uniform(-1, 1, (500, 32, 32, 1)).astype(np.float32)
  fake = clf.digit_fd(noise, variables=classifier_variables)
  assert real["num_images"] == 500
  assert real["fdd"] >= 0 and fake["fdd"] > 20 * real["fdd"]
  assert real["digit_is"] > 8.0 and real["confidence"] > 0.9
  assert 1.0 <= fake["digit_is"] < real["digit_is"]
  # Reference given as statistics or images gives the same number as the default.
  ref_stats = clf.mnist_reference_statistics(classifier_variables)
  again = clf.digit_fd(images[held], reference=ref_stats, variables=classifier_variables)
  assert again["fdd"] == pytest.approx(real["fdd"], rel=1e-9)
  self_fd = clf.digit_fd(images[held], reference=images[held], variables=classifier_variables)
  assert abs(self_fd["fdd"]) < 1e-6 * real["fdd"] + 1e-9
  # Raw 28x28 uint8 digits are padded to the same inputs.
  raw = clf.prepare_digits(np.zeros((2, 28, 28), np.uint8))
  assert raw.shape == (2, 32, 32, 1) and np.all(raw == -1.0)


def test_classifier_training_learns_the_digits():
  """The training code itself (the committed default classifier is its 600-step output): 30 steps
  already classify the never-seen held-out digits far above chance (10 %; 0.89 measured)."""
  variables = clf.train_classifier(seed=0, steps=30)
  images, labels = clf.embedded_digits()
  _, held = clf.held_out_split()
  assert clf.accuracy(variables, images[held], labels[held]) > 0.8


def test_classifier_save_load_and_cache(tmp_path, monkeypatch):
  # get_classifier: trains once (3 steps: only the caching is under test), saves, then loads.
  cache = tmp_path / "cache" / "digit_classifier.msgpack"
  first = clf.get_classifier(cache, seed=1, steps=3)
  loaded, meta = clf.load_classifier(cache)
  assert meta["seed"] == 1 and meta["steps"] == 3 and 0.0 <= meta["held_out_accuracy"] <= 1.0
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), first, loaded)
  assert all(jax.tree.leaves(same)) and len(jax.tree.leaves(same)) == 10
  path = tmp_path / "clf.msgpack"
  clf.save_classifier(path, first, note="x")
  assert clf.load_classifier(path)[1] == {"note": "x"}
  assert os.path.exists(cache)
  monkeypatch.setattr(clf, "train_classifier", lambda **kw: pytest.fail("retrained"))
  second = clf.get_classifier(cache, seed=1, steps=3)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), first, second)
  assert all(jax.tree.leaves(same))
  bad = tmp_path / "bad.msgpack"
  bad.write_bytes(b"\x80")
  with pytest.raises(ValueError):
    clf.load_classifier(bad)
