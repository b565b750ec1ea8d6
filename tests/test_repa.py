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


# ---------------------------------------------------------------------------- wiring into the model

def test_features_after_are_the_image_tokens_that_block_outputs():
  from asymflow_jax.models import jit_model  # pylint: disable=import-outside-toplevel
  cfg = jit_model.jit_config("tiny", depth=3, in_context_len=2, in_context_start=1)
  model = jit_model.JiT(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  t, labels = jnp.asarray([0.3, 0.8]), jnp.asarray([1, 5])
  params = model.init(jax.random.key(0), x, t, labels)["params"]
  out, inter = model.apply({"params": params}, x, t, labels, capture_intermediates=True,
                           mutable=["intermediates"])
  for k in range(cfg.depth):   # block 0 before the in-context tokens enter, blocks 1, 2 with them
    block_out = inter["intermediates"][f"blocks_{k}"]["__call__"][0]
    assert block_out.shape[1] == cfg.num_patches + (cfg.in_context_len if k >= 1 else 0)
    out_k, features = model.apply({"params": params}, x, t, labels, features_after=k)
    np.testing.assert_array_equal(np.asarray(out_k), np.asarray(out))
    assert features.shape == (2, cfg.num_patches, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(features), np.asarray(block_out[:, -cfg.num_patches:]))
  with pytest.raises(ValueError, match=r"features_after=3: JiT has blocks 0..2"):
    model.apply({"params": params}, x, t, labels, features_after=3)


def test_vgg16_encoder_tokens_are_the_lpips_trunk_tap():
  """The truncated VGG16 (REPA's offline ImageNet encoder) equals tap ``vgg_tap`` of the full LPIPS trunk
  on the same ImageNet-normalised, resized input; tokens in raster order of its grid."""
  from asymflow_jax.evaluation import lpips  # pylint: disable=import-outside-toplevel
  variables = lpips.load_lpips_params("vgg")
  enc = repa.Encoder("vgg16", grid=4, dtype=jnp.float32, vgg_tap=2)
  assert (enc.input_size, enc.dim) == (16, 256)
  params = repa.vgg16_params(variables, 2, jnp.float32)
  assert sorted(params) == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)
  tokens = enc.tokens(params, images)
  taps = lpips.VGG16Features(precision=None).apply({"params": variables["params"]["vgg"]},
                                                   repa.encoder_inputs(images, 16))
  assert tokens.shape == (2, 16, 256) and taps[2].shape == (2, 4, 4, 256)
  np.testing.assert_allclose(np.asarray(tokens).reshape(2, 4, 4, 256), np.asarray(taps[2]), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(tokens).max()) > 0


def test_repa_config_errors():
  from asymflow_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from tests.train_config import tiny_train_config  # pylint: disable=import-outside-toplevel
  config_lib.validate_config(tiny_train_config(repa=True), num_devices=1)
  cases = [(dict(block=2), r"config.repa.block=2: expected a block index in \[0, model.depth=2\)"),
           (dict(encoder="dinov3"), r"config.repa.encoder='dinov3': expected one of"),
           (dict(encoder_path=""), r"needs config.repa.encoder_path: a transformers DINOv2 folder"),
           (dict(encoder_path="/nonexistent"), r"encoder_path='/nonexistent' has no config.json"),
           (dict(weight=-1.0), r"config.repa.weight=-1.0: expected a number >= 0"),
           (dict(encoder="vgg16", vgg_tap=5), r"config.repa.vgg_tap=5: expected 0..4"),
           (dict(encoder_dtype="float16"), r"config.repa.encoder_dtype='float16'")]
  for overrides, message in cases:
    c = tiny_train_config(repa=True)
    c.repa.update(overrides)
    with pytest.raises(ValueError, match=message):
      config_lib.validate_config(c, num_devices=1, check_files=True)
  c = tiny_train_config(repa=True)
  c.objective = "asymflow_vr"
  with pytest.raises(ValueError, match=r"REPA is implemented for AsymJiT trained from scratch"):
    config_lib.validate_config(c, num_devices=1)


def test_repa_gradient_reaches_the_blocks_up_to_its_block_and_the_projector_only():
  """With REPA after block 0 of the tiny 2-block model, the flow term is unchanged (same key), the blocks
  after block 0 and the final layer get exactly the flow gradients, block 0 and the embedders get more."""
  from asymflow_jax import experiment, objective, sharding  # pylint: disable=import-outside-toplevel
  from tests.conftest import flat_params  # pylint: disable=import-outside-toplevel
  from tests.train_config import tiny_train_config  # pylint: disable=import-outside-toplevel
  on, off = tiny_train_config(repa=True), tiny_train_config()
  on.repa.block = 0
  exp = experiment.build(on, sharding.make_mesh(on.mesh), training=True)
  params = experiment.init_params(on, exp.model, jax.random.key(0))
  frozen = experiment.frozen_networks(on)
  rng = np.random.default_rng(3)
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 1)), jnp.float32),
               label=jnp.asarray(rng.integers(0, 10, 8), jnp.int32))
  basis = jnp.linalg.qr(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32))[0]
  key = jax.random.key(7)

  def grad(p, config, fr):
    loss = lambda p, fr: objective.flow_loss(p, batch, key, basis, 1.0, model=exp.model, config=config,  # noqa: E731
                                             frozen=fr)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(p, fr)

  (l_on, aux), g_on = grad(params, on, frozen)
  (l_off, _), g_off = grad(experiment.model_params(params), off, None)
  assert float(aux["loss_flow"]) == float(l_off)
  assert float(l_on) == pytest.approx(float(l_off) + float(aux["loss_repa"]), rel=1e-6)
  assert -0.5 <= float(aux["loss_repa"]) <= 0.5
  g_on, g_off = flat_params(g_on), flat_params(g_off)
  assert set(g_on) - set(g_off) == {k for k in g_on if k.startswith("['repa_projector']")} != set()
  assert all(np.abs(g_on[k]).max() > 0 for k in g_on if k.startswith("['repa_projector']"))
  for k, g in g_off.items():
    if k.startswith(("['blocks_1']", "['final_layer']", "['in_context_posemb']")):
      np.testing.assert_allclose(g_on[k], g, rtol=1e-5, atol=1e-7, err_msg=k)
  for prefix in ("['blocks_0']", "['x_embedder']"):
    diff = max(np.abs(g_on[k] - g_off[k]).max() for k in g_off if k.startswith(prefix))
    assert diff > 1e-4 * max(np.abs(g_off[k]).max() for k in g_off if k.startswith(prefix)), prefix
