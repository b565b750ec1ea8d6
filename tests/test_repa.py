"""REPA pieces (spec section 5): the alignment loss against a float64 NumPy derivation (value and the
gradient w.r.t. every projector parameter, backpropagated by hand), the projector's init, the encoder inputs."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax.models import dinov2, repa

B, N, HIDDEN, WIDTH, OUT = 2, 5, 6, 8, 4
WEIGHT = 0.5


def _silu(x):
  return x / (1 + np.exp(-x))


def _silu_grad(x):
  s = 1 / (1 + np.exp(-x))
  return s * (1 + x * (1 - s))


def _numpy_loss_and_grads(p, h, t, weight):
  """-weight * mean cos(projector(h), t) and d/d(projector params), float64, by hand."""
  z0 = h @ p["linear_0"]["kernel"] + p["linear_0"]["bias"]
  a0 = _silu(z0)
  z1 = a0 @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
  a1 = _silu(z1)
  z2 = a1 @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]
  n_p = np.linalg.norm(z2, axis=-1, keepdims=True)
  p_hat, t_hat = z2 / n_p, t / np.linalg.norm(t, axis=-1, keepdims=True)
  count = h.shape[0] * h.shape[1]
  loss = -weight * np.sum(p_hat * t_hat) / count
  d_phat = -weight * t_hat / count
  d_z2 = (d_phat - p_hat * np.sum(p_hat * d_phat, axis=-1, keepdims=True)) / n_p
  flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
  grads = {"linear_2": {"kernel": flat(a1).T @ flat(d_z2), "bias": flat(d_z2).sum(0)}}
  d_z1 = (d_z2 @ p["linear_2"]["kernel"].T) * _silu_grad(z1)
  grads["linear_1"] = {"kernel": flat(a0).T @ flat(d_z1), "bias": flat(d_z1).sum(0)}
  d_z0 = (d_z1 @ p["linear_1"]["kernel"].T) * _silu_grad(z0)
  grads["linear_0"] = {"kernel": flat(h).T @ flat(d_z0), "bias": flat(d_z0).sum(0)}
  return loss, grads


def test_alignment_loss_and_projector_gradient_match_a_float64_derivation():
  rng = np.random.default_rng(0)
  projector = repa.Projector(width=WIDTH, out_dim=OUT)
  h = rng.normal(size=(B, N, HIDDEN)).astype(np.float32)
  t = rng.normal(size=(B, N, OUT)).astype(np.float32)
  params = projector.init(jax.random.key(0), jnp.asarray(h))["params"]
  # non-zero biases, so every parameter's gradient path is exercised
  params = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.normal(size=x.shape), jnp.float32), params)
  loss, grads = jax.value_and_grad(lambda p: repa.repa_loss(projector, p, jnp.asarray(h), jnp.asarray(t),
                                                            WEIGHT))(params)
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  want, want_grads = _numpy_loss_and_grads(p64, h.astype(np.float64), t.astype(np.float64), WEIGHT)
  assert -WEIGHT < want < WEIGHT and abs(want) > 1e-3
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  for name in ("linear_0", "linear_1", "linear_2"):
    for leaf in ("kernel", "bias"):
      g, w = np.asarray(grads[name][leaf], np.float64), want_grads[name][leaf]
      assert np.abs(w).max() > 1e-4, (name, leaf)
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max(), err_msg=f"{name}/{leaf}")
  # the target carries no gradient; aligned features give -weight
  g_t = jax.grad(lambda tt: repa.repa_loss(projector, params, jnp.asarray(h), tt, WEIGHT))(jnp.asarray(t))
  assert float(jnp.abs(g_t).max()) == 0.0
  projected = projector.apply({"params": params}, jnp.asarray(h))
  np.testing.assert_allclose(float(repa.alignment_loss(projected, 3.0 * projected, WEIGHT)), -WEIGHT, rtol=1e-6)
  with pytest.raises(ValueError, match=r"projected features \(2, 5, 4\) and encoder tokens \(2, 4, 4\)"):
    repa.alignment_loss(projected, projected[:, :4], WEIGHT)


def test_projector_init_is_xavier_uniform_with_zero_biases():
  params = repa.Projector(width=64, out_dim=32).init(jax.random.key(1), jnp.zeros((1, 48)))["params"]
  for name, (fan_in, fan_out) in {"linear_0": (48, 64), "linear_1": (64, 64), "linear_2": (64, 32)}.items():
    k = np.asarray(params[name]["kernel"])
    assert k.shape == (fan_in, fan_out) and not np.asarray(params[name]["bias"]).any()
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert abs(k.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)   # uniform(-b, b): std b / sqrt(3)


def test_encoder_inputs_range_resize_and_normalisation():
  mean, std = np.asarray(repa.IMAGENET_MEAN), np.asarray(repa.IMAGENET_STD)
  # a constant grey image stays constant through the resize (rows of the matrix sum to 1), RGB from grey
  out = np.asarray(repa.encoder_inputs(jnp.full((2, 32, 32, 1), 0.2), 56))
  assert out.shape == (2, 56, 56, 3)
  np.testing.assert_allclose(out, np.broadcast_to((0.6 - mean) / std, out.shape), rtol=1e-5, atol=1e-6)
  # at the encoder size nothing is resampled: exactly ((x + 1) / 2 - mean) / std
  x = np.random.default_rng(2).uniform(-1, 1, (1, 14, 14, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(repa.encoder_inputs(jnp.asarray(x), 14)), ((x + 1) / 2 - mean) / std,
                             rtol=1e-5, atol=1e-6)
  # a hard black/white edge overshoots under the cubic kernel: clamped to [0, 1] after the resize
  edge = np.where(np.arange(16) < 8, 0.0, 1.0)[None, :] * np.ones((16, 1))           # [0, 1] range
  r = dinov2.bicubic_resize_matrix(16, 40, antialias=True)                              # torch parity: test_dinov2
  unclamped = r @ edge @ r.T
  assert unclamped.min() < -0.01 and unclamped.max() > 1.01
  up = np.asarray(repa.encoder_inputs(jnp.asarray(2 * edge - 1, jnp.float32)[None, :, :, None], 40))
  np.testing.assert_allclose(up[0, :, :, 1] * std[1] + mean[1], np.clip(unclamped, 0, 1), atol=2e-6)
  with pytest.raises(ValueError, match="1 or 3 channels"):
    repa.encoder_inputs(jnp.zeros((1, 8, 8, 2)), 14)
