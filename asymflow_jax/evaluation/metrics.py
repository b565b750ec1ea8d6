"""Sample-quality metrics: float64 feature statistics, Fréchet distance (FID), Inception Score,
reference statistics (ADM ``.npz``) and k-NN precision/recall.

Conventions: features are ``[N, D]`` arrays (any float dtype; statistics are accumulated in
float64 on the host); images handed to feature functions are float ``[B, H, W, C]`` in
``[-1, 1]`` (uint8 ``[B, H, W, C]`` images are converted with ``x / 127.5 - 1``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------


class RunningStatistics:
  """Streaming mean / covariance in float64 (Chan et al. pairwise merge of per-batch moments).

  ``update(batch [B, D])`` any number of times (uneven batch sizes are fine), then
  ``finalize() -> (mu [D] float64, sigma [D, D] float64)`` with ``sigma`` the unbiased
  (ddof=1) covariance, equal to ``np.cov(all_features, rowvar=False)``.
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._mean: np.ndarray | None = None
    self._m2: np.ndarray | None = None

  def update(self, batch) -> "RunningStatistics":
    x = np.asarray(batch, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"expected features [B, D], got shape {x.shape}")
    if self.dim is None:
      self.dim = x.shape[1]
    if x.shape[1] != self.dim:
      raise ValueError(f"feature dim {x.shape[1]} != {self.dim}")
    nb = x.shape[0]
    if nb == 0:
      return self
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    m2_b = centred.T @ centred
    if self.count == 0:
      self._mean, self._m2, self.count = mean_b, m2_b, nb
      return self
    na = self.count
    n = na + nb
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (nb / n)
    self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (na * nb / n)
    self.count = n
    return self

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
    return self._mean.copy(), self._m2 / (self.count - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """``features [N, D] -> (mu [D], sigma [D, D])`` in float64 (sigma with ddof=1)."""
  return RunningStatistics().update(features).finalize()


# ----------------------------------------------------------------------------
# Fréchet distance and Inception Score.
# ----------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

  d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

  ``method="sqrtm"`` (default, the FID convention): ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; if
  the result is not finite, ``eps * I`` is added to both covariances and it is retried; a
  complex result whose diagonal has an imaginary part above 1e-3 raises ValueError, otherwise
  the imaginary part (round-off) is dropped. ``method="eigh"``: the symmetric form
  tr((s1^{1/2} s2 s1^{1/2})^{1/2}) from two ``eigh`` calls (negative round-off eigenvalues
  clipped to 0); same value for PSD inputs, more robust for singular covariances.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"mean shapes differ or are not vectors: {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
  diff = mu1 - mu2
  if method == "sqrtm":
    with warnings.catch_warnings():  # singular products are expected (N < D); checked below
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
      if not np.all(np.isfinite(covmean)):
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
      max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
      if max_imag > 1e-3:
        raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component {max_imag:.3g}")
      covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
  elif method == "eigh":
    w1, v1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    inner = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(w, 0, None))))
  else:
    raise ValueError(f"unknown method {method!r}; use 'sqrtm' or 'eigh'")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from ``logits [N, K]`` (softmax over K).

  The N samples are cut into ``splits`` contiguous chunks (the first ``N % splits`` get one
  more); returns (mean, std) over the chunks. Computed in float64. Range ``[1, K]``.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"expected logits [N, K], got {logits.shape}")
  if not 1 <= splits <= logits.shape[0]:
    raise ValueError(f"splits must be in [1, N={logits.shape[0]}], got {splits}")
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for chunk in np.array_split(log_p, splits):
    p = np.exp(chunk)
    log_py = np.log(np.mean(p, axis=0))
    kl = np.sum(p * (chunk - log_py[None, :]), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# Batched feature extraction.
# ----------------------------------------------------------------------------


def to_model_range(images) -> np.ndarray:
  """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``; float images are returned as float32 unchanged."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def make_feature_fn(apply_fn: Callable, variables: Any, batch_size: int | None = None) -> FeatureFn:
  """Jitted batched extractor ``fn(images [N,H,W,C]) -> (features [N,F], logits [N,K])`` (numpy).

  ``apply_fn(variables, images)`` must return ``(features, logits)`` (e.g.
  ``InceptionV3().apply``, which resizes any input size to 299 inside). Images are floats in
  ``[-1, 1]`` (uint8 is converted). With ``batch_size`` the input is run in chunks of exactly
  that size (the last one zero-padded and cropped) so only one shape is ever compiled.
  """
  jitted = jax.jit(apply_fn)

  def fn(images):
    x = to_model_range(images)
    if batch_size is None:
      feats, logits = jitted(variables, jnp.asarray(x))
      return np.asarray(feats), np.asarray(logits)
    outs_f, outs_l = [], []
    for start in range(0, x.shape[0], batch_size):
      chunk = x[start:start + batch_size]
      n = chunk.shape[0]
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      feats, logits = jitted(variables, jnp.asarray(chunk))
      outs_f.append(np.asarray(feats)[:n])
      outs_l.append(np.asarray(logits)[:n])
    return np.concatenate(outs_f), np.concatenate(outs_l)

  return fn


def compute_statistics(feature_fn: FeatureFn, images: np.ndarray | Iterable[np.ndarray],
                       batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Float64 ``(mu, sigma)`` of ``feature_fn`` features over an image array or an iterable of batches."""
  stats = RunningStatistics()
  if hasattr(images, "shape"):
    array = images
    batches: Iterable = (array[i:i + batch_size] for i in range(0, array.shape[0], batch_size))
  else:
    batches = images
  for batch in batches:
    feats, _ = feature_fn(batch)
    stats.update(feats)
  return stats.finalize()


# ----------------------------------------------------------------------------
# Reference statistics (ADM evaluation-suite format).
# ----------------------------------------------------------------------------


def save_reference_statistics(path: str | os.PathLike, mu, sigma) -> None:
  """Writes ``{"mu": [D], "sigma": [D, D]}`` (float64) as an ADM-style ``.npz``."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_reference_statistics(path: str | os.PathLike, feature_fn: FeatureFn | None = None,
                              batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Reads reference ``(mu, sigma)`` (float64) from an ADM-format ``.npz``.

  Uses the ``"mu"`` / ``"sigma"`` arrays if present. Otherwise, if the file holds images under
  ``"arr_0"`` (uint8 ``[N, H, W, 3]``, as in ADM's ``VIRTUAL_imagenet256_labeled.npz``), the
  statistics are computed from them with ``feature_fn`` (required then). ValueError otherwise.
  """
  with np.load(path, allow_pickle=False) as data:
    keys = set(data.files)
    if {"mu", "sigma"} <= keys:
      mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
      if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: bad shapes mu {mu.shape}, sigma {sigma.shape}")
      return mu, sigma
    if "arr_0" not in keys:
      raise ValueError(f"{path}: no 'mu'/'sigma' and no 'arr_0' images (keys: {sorted(keys)})")
    if feature_fn is None:
      raise ValueError(f"{path} holds images ('arr_0') but no statistics; pass feature_fn")
    images = data["arr_0"]
  if images.ndim != 4:
    raise ValueError(f"{path}: 'arr_0' must be images [N, H, W, C], got {images.shape}")
  return compute_statistics(feature_fn, images, batch_size=batch_size)


# ----------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019).
# ----------------------------------------------------------------------------


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def _knn_radii(feats: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance of each row to its k-th nearest *other* row."""
  radii = np.empty(feats.shape[0])
  for s in range(0, feats.shape[0], block):
    d = _pairwise_sq_dists(feats[s:s + block], feats)
    radii[s:s + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int) -> float:
  inside = np.zeros(queries.shape[0], bool)
  for s in range(0, queries.shape[0], block):
    d = _pairwise_sq_dists(queries[s:s + block], manifold)
    inside[s:s + block] = np.any(d <= radii[None, :], axis=1)
  return float(np.mean(inside))


def precision_recall(real_features, fake_features, k: int = 3, block: int = 1024) -> tuple[float, float]:
  """Improved precision / recall: manifolds are unions of balls to each point's k-th neighbour.

  precision = fraction of fake features inside the real manifold; recall = fraction of real
  features inside the fake manifold. Float64, blocked over rows. Returns (precision, recall).
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"expected [N, D] features of equal D, got {real.shape} and {fake.shape}")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f"need more than k={k} points in each set")
  precision = _coverage(real, _knn_radii(real, k, block), fake, block)
  recall = _coverage(fake, _knn_radii(fake, k, block), real, block)
  return precision, recall


__all__ = (
    "RunningStatistics", "feature_statistics", "frechet_distance", "inception_score",
    "make_feature_fn", "compute_statistics", "to_model_range", "save_reference_statistics",
    "load_reference_statistics", "precision_recall",
)
