"""Pixel colour spaces of the model's pixel representation: ``"rgb"`` (the default) and ``"oklab"``.

Conventions:
  * images are float arrays ``[..., C]`` with channels last (NHWC in practice) holding RGB in
    ``[-1, 1]`` (gamma-encoded sRGB, the usual ``x / 127.5 - 1`` of uint8 pixels).
  * ``encode(images, space)`` maps them to the model's "latent pixels", ``decode(pixels, space)`` back.
  * ``"rgb"``: ``encode`` is the identity (any channel count, so 1-channel grey works);
    ``decode`` clips to ``[-1, 1]`` (``clip=True``, like the reference ``RGBColorEncoder``) or is
    the identity (``clip=False``).
  * ``"oklab"``: RGB ``[-1, 1]`` -> ``[0, 1]`` -> linear sRGB (exact sRGB transfer function,
    thresholds 0.04045 / 0.0031308, no clamp of the input) -> LMS (Ottosson's M1 for linear sRGB)
    -> clamp LMS at 0 -> cube root -> Oklab (Ottosson's M2) -> ``(lab - OKLAB_MEAN) / OKLAB_STD``.
    ``decode`` inverts each step with the exact (float64) inverses of M1 and M2; with ``clip=True``
    (the default, as the reference) linear RGB is clamped to ``[0, 1]`` before the transfer
    function, so the output lies in ``[-1, 1]``; ``clip=False`` is the unclamped inverse (negative
    linear values take the linear branch of the transfer function, values > 1 the power branch).
    Only 3-channel RGB is accepted (a clear ValueError otherwise): repeat grey to 3 channels first.
  * this mirrors the official AsymFlow ``OklabColorEncoder`` (LakonLab
    ``lakonlab/models/architectures/autoencoders/color_encoders.py``): same matrices, transfer
    function and clamps; its AsymFLUX.2 configs use ``mean=(0.56, 0.0, 0.01), std=0.16`` (the
    class default ``(0.5, 0, 0), 0.21`` is unused there), which are ``OKLAB_MEAN`` / ``OKLAB_STD``.
  * computation is in ``promote_types(dtype, float32)`` (matrix products at HIGHEST precision);
    the result has the input's float dtype. Gradients: ``decode`` is smooth except at the clamps;
    ``encode`` has an infinite cube-root slope at LMS = 0 (pure black), so do not differentiate
    through it there (it is meant for data, not for predictions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SPACES = ("rgb", "oklab")
OKLAB_MEAN = (0.56, 0.0, 0.01)
OKLAB_STD = 0.16

# Björn Ottosson, "A perceptual color space for image processing" (2020): linear sRGB -> LMS (M1,
# already composed with sRGB -> XYZ D65) and LMS^(1/3) -> Oklab (M2). Rows are output channels.
LINEAR_RGB_TO_LMS = np.array([
    [0.4122214708, 0.5363325363, 0.0514459929],
    [0.2119034982, 0.6806995451, 0.1073969566],
    [0.0883024619, 0.2817188376, 0.6299787005]], np.float64)
LMS_TO_OKLAB = np.array([
    [0.2104542553, 0.7936177850, -0.0040720468],
    [1.9779984951, -2.4285922050, 0.4505937099],
    [0.0259040371, 0.7827717662, -0.8086757660]], np.float64)
# Exact inverses (the reference inverts the same matrices with torch.linalg.inv); Ottosson's
# published inverse matrices agree to ~1e-9.
LMS_TO_LINEAR_RGB = np.linalg.inv(LINEAR_RGB_TO_LMS)
OKLAB_TO_LMS = np.linalg.inv(LMS_TO_OKLAB)

_SRGB_ENCODED_KNEE = 0.04045
_SRGB_LINEAR_KNEE = 0.0031308
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_space(space: str) -> str:
  if space not in SPACES:
    raise ValueError(f"unknown colour space {space!r}; expected one of {SPACES}")
  return space


def _as_float(x, what: str) -> jnp.ndarray:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what} must be a float array, got dtype {x.dtype}")
  if x.ndim < 1:
    raise ValueError(f"{what} must have a trailing channel axis, got a scalar")
  return x


def _check_rgb3(x, space: str, what: str):
  if x.shape[-1] != 3:
    raise ValueError(f"{what} for space {space!r} must have 3 channels (RGB, channels last), got "
                     f"shape {tuple(x.shape)}; repeat 1-channel grey images to 3 channels first")


def _apply(matrix: np.ndarray, x):
  """``matrix [3, 3]`` applied to the channel axis of ``x [..., 3]``."""
  return jnp.matmul(x, jnp.asarray(matrix.T, x.dtype), precision=_HIGHEST)


def srgb_to_linear(srgb):
  """sRGB transfer function inverse, elementwise on ``[0, 1]`` values (no clamp; <= knee is linear)."""
  power = ((jnp.maximum(srgb, _SRGB_ENCODED_KNEE) + 0.055) / 1.055) ** 2.4
  return jnp.where(srgb <= _SRGB_ENCODED_KNEE, srgb / 12.92, power)


def linear_to_srgb(linear):
  """sRGB transfer function, elementwise (no clamp; values <= 0.0031308, negatives too, are linear)."""
  power = 1.055 * jnp.maximum(linear, _SRGB_LINEAR_KNEE) ** (1.0 / 2.4) - 0.055
  return jnp.where(linear <= _SRGB_LINEAR_KNEE, linear * 12.92, power)


def linear_rgb_to_oklab(linear):
  """Linear sRGB ``[..., 3]`` -> unnormalised Oklab ``[..., 3]`` (L, a, b); LMS clamped at 0."""
  lms = jnp.maximum(_apply(LINEAR_RGB_TO_LMS, linear), 0.0)
  return _apply(LMS_TO_OKLAB, jnp.cbrt(lms))


def oklab_to_linear_rgb(lab):
  """Unnormalised Oklab ``[..., 3]`` -> linear sRGB ``[..., 3]`` (no clamp)."""
  lms = _apply(OKLAB_TO_LMS, lab) ** 3
  return _apply(LMS_TO_LINEAR_RGB, lms)


def encode(images, space: str = "rgb"):
  """RGB images ``[..., C]`` in ``[-1, 1]`` -> latent pixels of ``space`` (same shape and dtype).

  ``"oklab"`` needs ``C == 3`` and returns ``(Oklab - OKLAB_MEAN) / OKLAB_STD``.
  """
  _check_space(space)
  x = _as_float(images, "images")
  if space == "rgb":
    return x
  _check_rgb3(x, space, "images")
  ct = jnp.promote_types(x.dtype, jnp.float32)
  linear = srgb_to_linear(x.astype(ct) * 0.5 + 0.5)
  lab = linear_rgb_to_oklab(linear)
  out = (lab - jnp.asarray(OKLAB_MEAN, ct)) / jnp.asarray(OKLAB_STD, ct)
  return out.astype(x.dtype)


def decode(latent_pixels, space: str = "rgb", *, clip: bool = True):
  """Latent pixels ``[..., C]`` of ``space`` -> RGB images in ``[-1, 1]`` (same shape and dtype).

  ``clip=True`` (the reference): ``"rgb"`` clips to ``[-1, 1]``; ``"oklab"`` clamps linear RGB to
  ``[0, 1]``. ``clip=False``: the unclamped inverse of ``encode`` (identity for ``"rgb"``).
  """
  _check_space(space)
  z = _as_float(latent_pixels, "latent_pixels")
  if space == "rgb":
    return jnp.clip(z, -1.0, 1.0) if clip else z
  _check_rgb3(z, space, "latent_pixels")
  ct = jnp.promote_types(z.dtype, jnp.float32)
  lab = z.astype(ct) * jnp.asarray(OKLAB_STD, ct) + jnp.asarray(OKLAB_MEAN, ct)
  linear = oklab_to_linear_rgb(lab)
  if clip:
    linear = jnp.clip(linear, 0.0, 1.0)
  out = linear_to_srgb(linear) * 2.0 - 1.0
  return out.astype(z.dtype)
