"""A small digit classifier for the embedded MNIST default and the "Fréchet Digit Distance".

FDD = Fréchet distance between the 128-d penultimate features of this classifier on the given
images and on the 5000 embedded MNIST digits. It is the offline stand-in for FID when no
Inception weights are available; it is *not* comparable to Inception FID (see
``docs/evaluation.md``).

Conventions: images are float ``[N, 32, 32, 1]`` in ``[-1, 1]`` (the embedded digits zero-padded
by 2 px and scaled ``x / 127.5 - 1``); ``[N, 32, 32]`` and raw ``[N, 28, 28(, 1)]`` digits (then
padded with -1, i.e. black) and uint8 images are accepted too.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from asymflow_jax.data.sources import load_mnist_5k
from asymflow_jax.evaluation import metrics

FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 32
NUM_HELD_OUT = 500
DEFAULT_STEPS = 600
_FORMAT_VERSION = 1


class DigitClassifier(nn.Module):
  """CNN ``[B, 32, 32, 1] -> (features [B, 128], logits [B, 10])``.

  conv3x3(16) -> conv3x3/2(32) -> conv3x3/2(64) -> flatten(8*8*64) -> dense(128) (features,
  after ReLU) -> dense(10). ReLU after every conv.
  """

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv2")(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="conv3")(x))
    x = x.reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(FEATURE_DIM, name="fc1")(x))
    return feats, nn.Dense(NUM_CLASSES, name="fc2")(feats)


def prepare_digits(images) -> np.ndarray:
  """Any accepted digit layout -> float32 ``[N, 32, 32, 1]`` in ``[-1, 1]``.

  RGB digits (the embedded digits replicated to 3 channels, e.g. ``configs/asymjit_tiny.py``) are
  scored on the mean of their channels.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[1:3] not in ((28, 28), (32, 32)):
    raise ValueError(f"expected digits [N, 32|28, 32|28(, 1|3)], got shape {x.shape}")
  x = metrics.to_model_range(x)
  if x.shape[-1] == 3:
    x = x.mean(axis=-1, keepdims=True)
  if x.shape[1] == 28:
    x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
  return x


def embedded_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 5000 embedded MNIST digits: (float32 [5000, 32, 32, 1] in [-1, 1], int32 labels)."""
  images, labels = load_mnist_5k()
  return prepare_digits(images), np.asarray(labels, np.int32)


def held_out_split(num: int = 5000, num_held_out: int = NUM_HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
  """Fixed (seed-independent) split: (train indices, held-out indices) of a permutation of ``num``."""
  perm = np.random.default_rng(1234).permutation(num)
  return np.sort(perm[num_held_out:]), np.sort(perm[:num_held_out])


def classifier_features(variables: Mapping[str, Any], images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """``images -> (features [N, 128] float32, logits [N, 10] float32)`` (numpy)."""
  fn = metrics.make_feature_fn(DigitClassifier().apply, variables, batch_size=batch_size)
  return fn(prepare_digits(images))


def accuracy(variables: Mapping[str, Any], images, labels) -> float:
  _, logits = classifier_features(variables, images)
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def train_classifier(seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = 64,
                     learning_rate: float = 2e-3, verbose: bool = False) -> dict:
  """Trains :class:`DigitClassifier` on the 4500 training digits (adam, cross-entropy).

  Returns ``{"params": ...}``. Deterministic given ``seed`` (init + batch order). The 500
  held-out digits (:func:`held_out_split`) are never seen.
  """
  images, labels = embedded_digits()
  train_idx, _ = held_out_split(images.shape[0])
  x_train, y_train = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])
  model = DigitClassifier()
  rng = jax.random.PRNGKey(seed)
  init_rng = jax.random.fold_in(rng, 0)
  params = jax.jit(model.init)(init_rng, x_train[:1])["params"]
  schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.05)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  def loss_fn(p, xb, yb):
    _, logits = model.apply({"params": p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def step(p, s, idx, xs, ys):
    loss, grads = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  # Batch indices are drawn on the host (one jitted step per call; fast to compile on CPU).
  batches = np.random.default_rng(seed).integers(0, x_train.shape[0], size=(steps, batch_size))
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, batches[i], x_train, y_train)
    if verbose and ((i + 1) % 100 == 0 or i + 1 == steps):
      print(f"classifier step {i + 1}/{steps}: loss {float(loss):.4f}")
  return {"params": params}


def save_classifier(path: str | os.PathLike, variables: Mapping[str, Any], **meta) -> None:
  """Writes variables (+ JSON-able ``meta``) as flax msgpack, atomically (tmp file + rename)."""
  path = os.fspath(path)
  payload = {"version": _FORMAT_VERSION, "meta": dict(meta),
             "variables": jax.tree.map(np.asarray, dict(variables))}
  data = serialization.msgpack_serialize(payload)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_classifier(path: str | os.PathLike) -> tuple[dict, dict]:
  """Reads a file written by :func:`save_classifier` -> ``(variables, meta)``; ValueError if invalid."""
  with open(path, "rb") as f:
    payload = serialization.msgpack_restore(f.read())
  if not isinstance(payload, dict) or payload.get("version") != _FORMAT_VERSION or "variables" not in payload:
    raise ValueError(f"{path}: not a digit-classifier file (version {_FORMAT_VERSION})")
  template = jax.eval_shape(DigitClassifier().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32))
  variables = payload["variables"]
  want = jax.tree.map(lambda a: tuple(a.shape), template)
  got = jax.tree.map(lambda a: tuple(np.shape(a)), variables)
  if want != got:
    raise ValueError(f"{path}: variable shapes {got} do not match the classifier {want}")
  return jax.tree.map(jnp.asarray, variables), dict(payload.get("meta", {}))


def get_classifier(cache_path: str | os.PathLike | None = None, seed: int = 0,
                   steps: int = DEFAULT_STEPS, verbose: bool = False) -> dict:
  """Loads the classifier from ``cache_path`` if present, else trains it (and saves it there).

  Without ``cache_path`` the trained variables are cached in memory for this process.
  """
  key = (seed, steps)
  if cache_path is None:
    if key not in _MEMORY_CACHE:
      _MEMORY_CACHE[key] = train_classifier(seed=seed, steps=steps, verbose=verbose)
    return _MEMORY_CACHE[key]
  if os.path.exists(cache_path):
    variables, _ = load_classifier(cache_path)
    return variables
  variables = train_classifier(seed=seed, steps=steps, verbose=verbose)
  _, held = held_out_split()
  images, labels = embedded_digits()
  acc = accuracy(variables, images[held], labels[held])
  save_classifier(cache_path, variables, seed=seed, steps=steps, held_out_accuracy=acc)
  if verbose:
    print(f"digit classifier: held-out accuracy {acc:.4f}, saved to {cache_path}")
  return variables


_MEMORY_CACHE: dict = {}


def mnist_reference_statistics(variables: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Float64 ``(mu [128], sigma [128, 128])`` of classifier features over all 5000 embedded digits."""
  images, _ = embedded_digits()
  feats, _ = classifier_features(variables, images)
  return metrics.feature_statistics(feats)


def digit_fd(images, reference: Any = "mnist", *, variables: Mapping[str, Any] | None = None,
             cache_path: str | os.PathLike | None = None, seed: int = 0,
             steps: int = DEFAULT_STEPS) -> dict[str, float]:
  """Fréchet Digit Distance of ``images`` to a reference, plus classifier-based scores.

  Args:
    images: digits, float ``[N, 32, 32, 1]`` in ``[-1, 1]`` (see module doc), N >= 2.
    reference: ``"mnist"`` (all 5000 embedded digits), a ``(mu, sigma)`` pair, or an image array.
    variables / cache_path / seed / steps: the classifier; given ``variables`` are used as is,
      otherwise :func:`get_classifier` (trains once, cached at ``cache_path``).

  Returns a dict: ``fdd`` (Fréchet distance in the 128-d feature space, float64; 0 = same
  feature statistics), ``digit_is`` (exp E KL(p(y|x) || p(y)) over the 10 classes, in [1, 10];
  one split), ``confidence`` (mean max softmax probability), ``num_images``.
  """
  if variables is None:
    variables = get_classifier(cache_path, seed=seed, steps=steps)
  feats, logits = classifier_features(variables, images)
  mu, sigma = metrics.feature_statistics(feats)
  if isinstance(reference, str):
    if reference != "mnist":
      raise ValueError(f"unknown reference {reference!r}; use 'mnist', (mu, sigma) or images")
    mu_ref, sigma_ref = mnist_reference_statistics(variables)
  elif isinstance(reference, tuple) and len(reference) == 2:
    mu_ref, sigma_ref = reference
  else:
    ref_feats, _ = classifier_features(variables, reference)
    mu_ref, sigma_ref = metrics.feature_statistics(ref_feats)
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return {
      "fdd": metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
      "digit_is": metrics.inception_score(logits, splits=1)[0],
      "confidence": float(jnp.mean(jnp.max(probs, axis=-1))),
      "num_images": int(feats.shape[0]),
  }


__all__ = (
    "DigitClassifier", "prepare_digits", "embedded_digits", "held_out_split", "classifier_features",
    "accuracy", "train_classifier", "save_classifier", "load_classifier", "get_classifier",
    "mnist_reference_statistics", "digit_fd",
)
