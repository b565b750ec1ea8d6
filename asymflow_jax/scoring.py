"""Scoring generated images: FID + Inception Score (local Inception weights) or the offline FDD.

    scorer = scoring.make_scorer("fid", inception="fid_inception.npz", reference="ref.npz", num_images=50_000)
    result = scorer(images)       # {"metric": "fid", "fid": ..., "inception_score": ..., ...}

:func:`make_scorer` loads and checks every input (weights, reference statistics, image count)
*before* any image is generated, so a wrong path fails in seconds, not after an hour of sampling.
A non-finite result raises FloatingPointError instead of being reported as a number.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from asymflow_jax.config import EVAL_METRICS, IS_SPLITS
from asymflow_jax.evaluation import classifier
from asymflow_jax.evaluation import inception as inception_lib
from asymflow_jax.evaluation import metrics


@dataclasses.dataclass
class Scorer:
  """A prepared metric: call it on uint8 [0, 255] or float [-1, 1] NHWC images."""

  metric: str
  score: Callable[[np.ndarray], dict]
  min_images: int

  def __call__(self, images) -> dict:
    images = metrics.to_model_range(images)
    if images.shape[0] < self.min_images:
      raise ValueError(f"{self.metric} needs at least {self.min_images} images, got {images.shape[0]}.")
    result = self.score(images)
    bad = {k: v for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
      raise FloatingPointError(f"{self.metric} evaluation gave non-finite values {bad}; check the images "
                               "and the reference statistics for NaN/Inf.")
    return result


def _fdd_scorer(classifier_cache) -> Scorer:
  def score(images):
    r = classifier.digit_fd(images, cache_path=classifier_cache)
    return dict(metric="fdd", fdd=r["fdd"], digit_is=r["digit_is"], confidence=r["confidence"],
                num_images=r["num_images"])
  return Scorer("fdd", score, min_images=2)


def _load_reference(path: str, feature_fn) -> tuple[np.ndarray, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics {path!r} not found (an ADM .npz with mu/sigma or arr_0 images).")
  mu, sigma = metrics.load_reference_statistics(path, feature_fn)
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise FloatingPointError(f"reference statistics {path!r} contain NaN or Inf values.")
  return mu, sigma


def _fid_scorer(inception: str | None, reference: str | None, batch_size: int) -> Scorer:
  if not inception or not reference:
    raise ValueError("--metric=fid needs --inception (weights .npz, see docs/evaluation.md) and --reference "
                     "(ADM reference .npz with mu/sigma or arr_0 images).")
  variables = inception_lib.load_inception_npz(inception)
  feature_fn = metrics.make_feature_fn(inception_lib.InceptionV3().apply, variables, batch_size=batch_size)
  mu_ref, sigma_ref = _load_reference(reference, feature_fn)
  # weights imported from the TorchScript FID graph have no classifier (fc is NaN): FID only, no IS
  has_classifier = bool(np.isfinite(np.asarray(variables["params"]["fc"]["kernel"])).all())

  def score(images):
    stats, logits = metrics.RunningStatistics(), []
    for start in range(0, images.shape[0], batch_size):
      feats, lg = feature_fn(images[start:start + batch_size])
      stats.update(feats)
      logits.append(lg)
    mu, sigma = stats.finalize()
    out = dict(metric="fid", fid=metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
               num_images=int(images.shape[0]))
    if has_classifier:
      out["inception_score"], out["inception_score_std"] = metrics.inception_score(
          np.concatenate(logits)[:, :1000], splits=IS_SPLITS)
    return out
  return Scorer("fid", score, min_images=IS_SPLITS)


def make_scorer(metric: str, *, inception: str | None = None, reference: str | None = None,
                classifier_cache: str | None = None, num_images: int | None = None,
                batch_size: int = 50) -> Scorer:
  """Checks and loads everything ``metric`` needs; raises before any image is generated.

  ``fdd``: Frechet Digit Distance to the embedded MNIST digits (+ digit IS); ``classifier_cache``
  keeps the trained digit classifier. ``fid``: FID to ``reference`` (ADM .npz: mu/sigma, or arr_0
  images) and Inception Score, with Inception weights from the local ``inception`` .npz.
  ``num_images``: how many images will be scored (checked against the metric's minimum).
  """
  if metric not in EVAL_METRICS:
    raise ValueError(f"metric must be one of {EVAL_METRICS}, got {metric!r}.")
  scorer = _fdd_scorer(classifier_cache) if metric == "fdd" else _fid_scorer(inception, reference, batch_size)
  if num_images is not None and num_images < scorer.min_images:
    raise ValueError(f"--num={num_images}: {metric} needs at least {scorer.min_images} images"
                     + (f" (the Inception Score uses {IS_SPLITS} splits)." if metric == "fid" else "."))
  return scorer


def score_images(images, metric: str, **kwargs: Any) -> dict:
  """One-shot :func:`make_scorer` + call."""
  return make_scorer(metric, num_images=int(np.shape(images)[0]), **kwargs)(images)
