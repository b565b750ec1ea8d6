"""Pixel colour spaces: "rgb" identity, "oklab" against Ottosson's published values, exact inverses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymflow_jax import colorspace as cs

_encode = jax.jit(cs.encode, static_argnames="space")
_decode = jax.jit(cs.decode, static_argnames=("space", "clip"))

# sRGB primaries in unnormalised Oklab (L, a, b), from Ottosson's linear-sRGB matrices (the
# values quoted with his post and used by CSS Color 4 / Color.js test suites).
OKLAB_REFERENCE = [
    ((1.0, 1.0, 1.0), (1.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (0.6279553606145516, 0.2248630610659740, 0.1258462985307351)),
    ((0.0, 1.0, 0.0), (0.8664396115356694, -0.2338875741879082, 0.1794984798967299)),
    ((0.0, 0.0, 1.0), (0.4520137183853429, -0.0324569841687640, -0.3115281476783751)),
]


def _unnormalise(z):
  return np.asarray(z, np.float64) * cs.OKLAB_STD + np.asarray(cs.OKLAB_MEAN)


@pytest.mark.parametrize("srgb01, lab", OKLAB_REFERENCE)
def test_primaries_match_published_oklab(srgb01, lab):
  rgb = jnp.asarray(srgb01, jnp.float32) * 2 - 1
  np.testing.assert_allclose(_unnormalise(_encode(rgb, "oklab")), lab, atol=1e-6)
  np.testing.assert_allclose(_decode((jnp.asarray(lab, jnp.float32) - jnp.asarray(cs.OKLAB_MEAN))
                                       / cs.OKLAB_STD, "oklab"), rgb, atol=1e-5)


def test_normalisation_constants():
  assert cs.SPACES == ("rgb", "oklab")
  assert cs.OKLAB_MEAN == (0.56, 0.0, 0.01) and cs.OKLAB_STD == 0.16
  # White (Oklab (1, 0, 0)) -> ((1 - 0.56) / 0.16, -0.01 / 0.16 ...) up to the b offset.
  z = np.asarray(_encode(jnp.ones((1, 1, 1, 3)), "oklab"))[0, 0, 0]
  np.testing.assert_allclose(z, [(1 - 0.56) / 0.16, 0.0, -0.01 / 0.16], atol=1e-5)


def test_matrices_are_ottossons_and_inverses_exact():
  np.testing.assert_allclose(cs.LMS_TO_LINEAR_RGB[0], [4.0767416621, -3.3077115913, 0.2309699292], atol=1e-8)
  np.testing.assert_allclose(cs.OKLAB_TO_LMS[:, 1], [0.3963377774, -0.1055613458, -0.0894841775], atol=1e-8)
  np.testing.assert_allclose(cs.LINEAR_RGB_TO_LMS @ cs.LMS_TO_LINEAR_RGB, np.eye(3), atol=1e-12)


def test_round_trip_float32():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 16, 16, 3)), jnp.float32)
  z = _encode(x, "oklab")
  assert z.shape == x.shape and z.dtype == jnp.float32
  err = np.abs(np.asarray(_decode(z, "oklab")) - np.asarray(x))
  # float32 rounding through M1^-1 (entries ~4, cancelling) and the sRGB slope (12.92 near black)
  # bounds dark saturated colours at a few 1e-5 (< 1% of a uint8 step); typical colours ~1e-6.
  assert np.percentile(err, 99) < 1e-5 and err.max() < 1e-4
  np.testing.assert_allclose(_decode(z, "oklab", clip=False), x, atol=1e-4)


def test_round_trip_float64():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (10000, 3)), jnp.float64)
    z = _encode(x, "oklab")
    assert z.dtype == jnp.float64
    np.testing.assert_allclose(_decode(z, "oklab"), x, atol=1e-10)
    np.testing.assert_allclose(_decode(z, "oklab", clip=False), x, atol=1e-10)


def test_bfloat16_keeps_dtype():
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 3)), jnp.bfloat16)
  z = _encode(x, "oklab")
  assert z.dtype == jnp.bfloat16 and _decode(z, "oklab").dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(_decode(z, "oklab")), np.float32(x), atol=3e-2)


def test_decode_clips_like_the_reference():
  z = jnp.asarray([[[[5.0, 3.0, -4.0], [-10.0, 0.0, 0.0]]]], jnp.float32)  # far out of gamut
  rgb = np.asarray(_decode(z, "oklab"))
  assert rgb.min() >= -1 and rgb.max() <= 1
  assert np.asarray(_decode(z, "oklab", clip=False)).max() > 1
  np.testing.assert_array_equal(_decode(jnp.asarray([-3.0, 0.5, 2.0]), "rgb"), [-1.0, 0.5, 1.0])


def test_rgb_is_identity_for_any_channel_count():
  for c in (1, 3):
    x = jnp.asarray(np.random.default_rng(c).uniform(-1, 1, (2, 8, 8, c)), jnp.float32)
    assert cs.encode(x, "rgb") is x
    np.testing.assert_array_equal(cs.decode(x, "rgb"), x)
    np.testing.assert_array_equal(cs.decode(cs.encode(x), clip=False), x)


def test_decode_has_finite_gradients():
  z = _encode(jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (8, 3)), jnp.float32), "oklab")
  g = jax.grad(lambda v: jnp.sum(_decode(v, "oklab")))(z)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="unknown colour space 'lab'"):
    cs.encode(jnp.zeros((1, 3)), "lab")
  with pytest.raises(ValueError, match="3 channels"):
    cs.encode(jnp.zeros((2, 8, 8, 1)), "oklab")
  with pytest.raises(ValueError, match="3 channels"):
    cs.decode(jnp.zeros((2, 8, 8, 4)), "oklab")
  with pytest.raises(ValueError, match="float array"):
    cs.encode(jnp.zeros((2, 8, 8, 3), jnp.uint8), "oklab")
