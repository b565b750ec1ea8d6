"""The FID InceptionV3 (TF ``2015-12-05`` graph as ported by pytorch-fid) in flax.linen, NHWC.

Conventions:
  * input: float images ``[B, H, W, C]`` in ``[-1, 1]``, ``C`` in {1, 3} (grey is repeated to RGB),
    any ``H, W``; they are resized to ``input_size`` x ``input_size`` (299 for FID) with bilinear
    interpolation, half-pixel centres and *no* antialiasing (= torch
    ``F.interpolate(..., mode="bilinear", align_corners=False)``, what pytorch-fid does).
  * output: ``(pool3 [B, 2048], logits [B, 1008])``; pool3 is the global average of ``Mixed_7c``
    (the FID feature), logits = ``fc(pool3)`` (the 1008-way head used for Inception Score).
  * FID-specific blocks: the average pools inside InceptionA/C/E_1 exclude the padding from the
    count (``count_include_pad=False``) and ``Mixed_7c`` (E_2) uses a 3x3 *max* pool on its pool
    branch. Every conv is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.
  * parameter names mirror the pytorch-fid state-dict names, e.g. torch
    ``Mixed_5b.branch1x1.conv.weight`` is ``params/Mixed_5b/branch1x1/conv/kernel`` here.

Weights: :func:`load_inception_npz` reads a flat ``.npz`` with the pytorch-fid state-dict names
(see ``docs/evaluation.md`` for producing it once from ``pt_inception-2015-12-05-6726825d.pth``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Variables = Mapping[str, Any]

FID_INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
# Smallest input the stride pattern admits (the last stride-2 stage must see >= 3 pixels).
MIN_INPUT_SIZE = 75

_he_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _pad(ph: int, pw: int):
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU; torch ``BasicConv2d``."""

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=_pad(*self.padding),
                use_bias=False, kernel_init=_he_init, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg3(x):
  """3x3 / stride 1 / pad 1 average pool that ignores the padding (FID blocks)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max3s1(x):
  """3x3 / stride 1 / pad 1 max pool (padding is -inf): the E_2 pool branch."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (``FIDInceptionA``): 64 + 64 + 96 + pool_features channels."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    C = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
    b1 = C(64, (1, 1), name="branch1x1")(x)
    b5 = C(48, (1, 1), name="branch5x5_1")(x)
    b5 = C(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
    b3 = C(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = C(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
    b3 = C(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
    bp = C(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17, 384 + 96 + in channels."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    P = self.precision
    b3 = BasicConv(384, (3, 3), strides=(2, 2), precision=P, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), precision=P, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), precision=P, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=(2, 2), precision=P, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (``FIDInceptionC``): factorised 7x7 convolutions, 4 x 192 channels."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c7, P = self.channels_7x7, self.precision
    C = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=P, name=name)
    b1 = C(192, (1, 1), name="branch1x1")(x)
    b7 = C(c7, (1, 1), name="branch7x7_1")(x)
    b7 = C(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
    b7 = C(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
    bd = C(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = C(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
    bd = C(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
    bd = C(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
    bd = C(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
    bp = C(192, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8, 320 + 192 + in channels."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    P = self.precision
    C = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv(f, k, strides=s, padding=p, precision=P, name=name)
    b3 = C(192, (1, 1), name="branch3x3_1")(x)
    b3 = C(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = C(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = C(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
    b7 = C(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
    b7 = C(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (``FIDInceptionE_1``, avg pool) / Mixed_7c (``FIDInceptionE_2``, max pool); 2048 ch."""

  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    P = self.precision
    C = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=P, name=name)
    b1 = C(320, (1, 1), name="branch1x1")(x)
    b3 = C(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([C(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                          C(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = C(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = C(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([C(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                          C(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = _max3s1(x)
    else:
      pooled = _avg3(x)
    bp = C(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """``[B, H, W, C] -> [B, size, size, C]``, bilinear, half-pixel centres, no antialias."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


class InceptionV3(nn.Module):
  """FID InceptionV3. ``__call__(images [B,H,W,C] in [-1,1]) -> (pool3 [B,2048], logits [B,1008])``.

  ``input_size``: side the input is resized to (299 = FID; smaller values >= 75 only for cheap
  tests). ``precision``: conv/dense matmul precision (HIGHEST keeps TPUs off bf16 passes).
  """

  input_size: int = FID_INPUT_SIZE
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"expected images [B, H, W, 1|3], got shape {images.shape}")
    if self.input_size < MIN_INPUT_SIZE:
      raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE}, got {self.input_size}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, self.input_size)
    P = self.precision
    C = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv(f, k, strides=s, padding=p, precision=P, name=name)
    x = C(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = C(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = C(64, (3, 3), p=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = C(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = C(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, precision=P, name="Mixed_5b")(x)
    x = InceptionA(64, precision=P, name="Mixed_5c")(x)
    x = InceptionA(64, precision=P, name="Mixed_5d")(x)
    x = InceptionB(precision=P, name="Mixed_6a")(x)
    x = InceptionC(128, precision=P, name="Mixed_6b")(x)
    x = InceptionC(160, precision=P, name="Mixed_6c")(x)
    x = InceptionC(160, precision=P, name="Mixed_6d")(x)
    x = InceptionC(192, precision=P, name="Mixed_6e")(x)
    x = InceptionD(precision=P, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=P, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=P, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=P, name="fc")(pool)
    return pool, logits


# ----------------------------------------------------------------------------
# Weights: flat torch-named .npz <-> flax variables.
# ----------------------------------------------------------------------------

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch_layout(path: tuple[str, ...], collection: str) -> tuple[str, str]:
  """flax (collection, path) -> (torch key, layout kind in {"conv", "linear", "same"})."""
  *mods, leaf = path
  prefix = ".".join(mods)
  if collection == "batch_stats":
    return f"{prefix}.{ {'mean': 'running_mean', 'var': 'running_var'}[leaf] }", "same"
  if leaf == "kernel":
    return f"{prefix}.weight", ("conv" if mods[-1] == "conv" else "linear")
  if leaf == "scale":
    return f"{prefix}.weight", "same"
  if leaf == "bias":
    return f"{prefix}.bias", "same"
  raise ValueError(f"unexpected flax leaf {collection}/{'/'.join(path)}")


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # HWIO -> OIHW
    return np.transpose(value, (3, 2, 0, 1))
  if kind == "linear":  # (in, out) -> (out, in)
    return np.transpose(value)
  return value


def _from_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # OIHW -> HWIO
    return np.transpose(value, (2, 3, 1, 0))
  if kind == "linear":
    return np.transpose(value)
  return value


def _abstract_variables() -> Variables:
  module = InceptionV3(input_size=MIN_INPUT_SIZE)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32))


def _flat_spec(variables: Variables):
  """Yields (torch key, collection, flax path, layout kind, flax leaf)."""
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(dict(variables[collection])).items():
      key, kind = _torch_layout(path, collection)
      yield key, collection, path, kind, leaf


def inception_state_dict(variables: Variables) -> dict[str, np.ndarray]:
  """flax variables -> flat dict with pytorch-fid names and torch layouts (OIHW, (out, in))."""
  return {key: _to_torch(np.asarray(leaf, np.float32), kind)
          for key, _, _, kind, leaf in _flat_spec(variables)}


def save_inception_npz(path: str | os.PathLike, variables: Variables) -> None:
  """Writes variables as a flat torch-named ``.npz`` (the format :func:`load_inception_npz` reads)."""
  np.savez(path, **inception_state_dict(variables))


def inception_variables_from_state_dict(state: Mapping[str, np.ndarray]) -> dict:
  """Flat pytorch-fid state dict (numpy arrays) -> flax variables ``{"params", "batch_stats"}``.

  Keys ending in ``num_batches_tracked`` are ignored. Raises ValueError listing every missing,
  unexpected and misshaped key.
  """
  spec = list(_flat_spec(_abstract_variables()))
  expected = {key for key, *_ in spec}
  given = {k for k in state if not k.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(expected - given)
  unexpected = sorted(given - expected)
  misshaped = []
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, collection, path, kind, leaf in spec:
    if key not in state:
      continue
    value = np.asarray(state[key])
    want = _to_torch(np.zeros(leaf.shape, np.float32), kind).shape
    if value.shape != want:
      misshaped.append(f"{key}: got {value.shape}, expected {want}")
      continue
    out[collection][path] = jnp.asarray(_from_torch(value.astype(np.float32), kind))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
  if misshaped:
    problems.append(f"misshaped keys ({len(misshaped)}): {misshaped}")
  if problems:
    raise ValueError("Inception weights do not match the FID InceptionV3: " + "; ".join(problems))
  return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}


def load_inception_npz(path: str | os.PathLike) -> dict:
  """Loads a flat ``.npz`` with pytorch-fid state-dict names -> flax variables.

  Conversions: conv ``OIHW -> HWIO``, ``fc.weight (1008, 2048) -> kernel (2048, 1008)``, BN
  ``weight/bias/running_mean/running_var -> scale/bias/mean/var`` (eps is fixed at 1e-3).
  Raises FileNotFoundError if absent, ValueError listing missing/unexpected/misshaped keys.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} not found; produce them once as described in docs/evaluation.md")
  with np.load(path, allow_pickle=False) as data:
    state = {k: data[k] for k in data.files}
  try:
    return inception_variables_from_state_dict(state)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def random_inception_variables(rng: jax.Array, randomize_batch_norm: bool = True) -> dict:
  """Random FID-Inception variables for tests, drawn on the host with numpy (fast).

  Conv kernels ~ N(0, 2 / fan_in) (He), fc ~ N(0, 1 / 2048), fc bias ~ N(0, 0.01^2). With
  ``randomize_batch_norm`` every BN tensor is distinct (scale, var ~ U(0.5, 1.5); bias, mean ~
  N(0, 0.1^2)) so that a swapped name in a converter changes the output; otherwise BN is the
  identity (scale 1, bias 0, mean 0, var 1).
  """
  seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
  np_rng = np.random.default_rng(seed)
  abstract = _abstract_variables()
  out = {}
  for collection in ("params", "batch_stats"):
    flat = {}
    for path, leaf in traverse_util.flatten_dict(dict(abstract[collection])).items():
      shape, leafname = leaf.shape, path[-1]
      if leafname == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        gain = 2.0 if path[-2] == "conv" else 1.0
        value = np_rng.standard_normal(shape) * np.sqrt(gain / fan_in)
      elif path[-2] == "fc":  # fc bias
        value = np_rng.normal(0.0, 0.01, shape)
      elif randomize_batch_norm:
        value = (np_rng.uniform(0.5, 1.5, shape) if leafname in ("scale", "var")
                 else np_rng.normal(0.0, 0.1, shape))
      else:
        value = np.ones(shape) if leafname in ("scale", "var") else np.zeros(shape)
      flat[path] = jnp.asarray(value, jnp.float32)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


__all__: Sequence[str] = (
    "InceptionV3", "load_inception_npz", "save_inception_npz", "inception_state_dict",
    "inception_variables_from_state_dict", "random_inception_variables", "resize_bilinear",
    "FID_INPUT_SIZE", "POOL_FEATURES", "NUM_LOGITS",
)
