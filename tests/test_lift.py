"""The latent-to-pixel lift (spec sections 7-8) against float64 NumPy derivations."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax import asymflow as af
from asymflow_jax import lift
from asymflow_jax import sampling
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.models import asymjit, jit_model

# Latent model: 8x8x4 latents, patch 2 -> 16 tokens of d = 16. Pixel model: x4 -> 32x32x1, patch 8, D = 64.
LATENT = jit_model.JiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                             bottleneck_dim=16, in_context_len=2, in_context_start=1, num_classes=10)
FACTOR = 4
SCALE = 0.7


def _random_params(model, seed):
  """Initialised parameters with every leaf replaced by N(0, 0.1^2) (zero-init layers included)."""
  @jax.jit
  def make(key):
    leaves, treedef = jax.tree.flatten(asymjit.init_params(model, key))
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  return make(jax.random.key(seed))


def _orthonormal(rows, cols, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
  return q.astype(np.float32)


@pytest.fixture(scope="module")
def lifted():
  latent_model = jit_model.JiT(LATENT)
  pixel_cfg = lift.pixel_jit_config(LATENT, FACTOR, 1)
  pixel_model = jit_model.JiT(pixel_cfg)
  params = _random_params(latent_model, 0)
  basis = _orthonormal(pixel_cfg.patch_dim, LATENT.patch_dim, 1)
  return latent_model, pixel_model, params, basis, lift.lift_jit_params(params, basis)


def test_lift_rewrites_exactly_the_token_projections(lifted):
  _, pixel_model, params, basis, new = lifted
  u = basis.astype(np.float64)
  w_in = np.asarray(params["x_embedder"]["proj1"]["kernel"], np.float64)
  w_out = np.asarray(params["final_layer"]["linear"]["kernel"], np.float64)
  b_out = np.asarray(params["final_layer"]["linear"]["bias"], np.float64)
  np.testing.assert_allclose(new["x_embedder"]["proj1"]["kernel"], u @ w_in, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new["final_layer"]["linear"]["kernel"], w_out @ u.T, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new["final_layer"]["linear"]["bias"], u @ b_out, rtol=1e-5, atol=1e-7)
  # Every other leaf is the latent model's, and the tree fits the pixel model's shapes.
  flat_old = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(new):
    name = jax.tree_util.keystr(path)
    if "proj1" not in name and "'linear'" not in name:
      np.testing.assert_array_equal(leaf, flat_old[path])
  want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(jit_model.abstract_params(pixel_model)))
  assert jax.tree.map(lambda a: a.shape, new) == want


def test_lift_errors_name_the_mismatch(lifted):
  _, _, params, basis, _ = lifted
  with pytest.raises(ValueError, match=r"input kernel x_embedder/proj1/kernel has shape \(16, 16\); expected \(15"):
    lift.lift_jit_params(params, _orthonormal(64, 15, 0))
  with pytest.raises(KeyError, match="final_layer/nope"):
    lift.lift_params(params, basis, in_kernel=lift.JIT_IN_KERNEL, out_kernel=("final_layer", "nope"))
  with pytest.raises(ValueError, match="not orthonormal"):
    lift.lift_jit_params(params, 2 * basis)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.8, 1.0])
def test_lifted_velocity_is_the_lifted_latent_velocity(lifted, sigma):
  """Independent derivation: the latent model (a black box predicting the latent velocity v) sees
  z' = k U^T x_sigma at sigma' = k sigma; its x0 estimate z' - sigma' v, lifted by s U, is the pixel
  x0_hat, and the pixel velocity is (x_sigma - x0_hat) / sigma. The pixel model's complement x0_hat is 0."""
  latent_model, pixel_model, params, basis, new = lifted
  rng = np.random.default_rng(3)
  b = 3
  z0 = rng.normal(size=(b, 8, 8, 4)).astype(np.float32)
  x0 = np.asarray(lift.low_rank_image(jnp.asarray(z0), basis, SCALE, latent_patch_size=2, patch_size=8))
  noise = rng.normal(size=x0.shape).astype(np.float32)       # full-rank pixel noise
  sig = np.full((b,), sigma, np.float32)
  x_t = ((1 - sigma) * x0 + sigma * noise).astype(np.float32)
  labels = jnp.asarray([1, 4, 10])
  u = jax.jit(lambda p, x, sg: asymjit.asymjit_apply(pixel_model, p, x, sg, labels, jnp.asarray(basis),
                                                     scale=SCALE, sigma_min=1e-4))(new, jnp.asarray(x_t), jnp.asarray(sig))

  u64, s = basis.astype(np.float64), SCALE
  k = 1.0 / (s + (1 - s) * sigma)
  x_tok = np.asarray(af.patchify(jnp.asarray(x_t), 8), np.float64)          # (B, 16, 64)
  z_tok = k * x_tok @ u64                                                  # (B, 16, 16) latent state at k sigma
  z_img = af.unpatchify(jnp.asarray(z_tok, jnp.float32), 2, 8, 8)
  v = np.asarray(jax.jit(latent_model.apply)({"params": params}, z_img, jnp.full((b,), k * sigma, jnp.float32),
                                              labels), np.float64)                                               # latent velocity tokens
  x0_hat = s * (z_tok - k * sigma * v) @ u64.T                             # (B, 16, 64)
  want = (x_tok - x0_hat) / sigma
  got = np.asarray(af.patchify(u, 8), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  x0_model = x_tok - sigma * got
  complement = x0_model - x0_model @ u64 @ u64.T
  assert np.abs(complement).max() < 1e-4 * np.abs(x0_model).max()


def test_samples_of_the_lifted_model_lie_in_the_subspace(lifted):
  _, pixel_model, _, basis, new = lifted
  vel = sampling.asymjit_velocity_fn(pixel_model, new, jnp.asarray(basis), SCALE, sigma_min=1e-4)
  noise = jax.random.normal(jax.random.key(5), (4, 32, 32, 1))
  x = jax.jit(lambda n: sampling.sample(vel, n, jnp.arange(4), num_steps=8, method="heun", cfg=False))(noise)
  tok = np.asarray(af.patchify(x, 8), np.float64)
  u64 = basis.astype(np.float64)
  inside = tok @ u64 @ u64.T
  assert np.abs(tok - inside).max() < 1e-4 * np.abs(inside).max()
  assert np.abs(inside).max() > 0.1


def test_basis_for_dit_reorders_rows_and_columns_consistently():
  """A Procrustes-format U (rows channel-first pixels, columns channel-first latents) decodes a latent
  image to the same pixel image as the DiT-ordered basis used by the model, computed with reshapes."""
  p, p_l, c, c_l = 4, 2, 3, 2
  d_pix, d_lat = p * p * c, p_l * p_l * c_l
  u_cf = _orthonormal(d_pix, d_lat, 7)
  sub = subspace_lib.Subspace(basis=u_cf, patch_size=p, scale=1.3, packing="channel_first")
  z = np.random.default_rng(8).normal(size=(2, 4, 6, c_l)).astype(np.float32)   # 2x3 latent tokens
  # channel-first tokens by hand: (B, gh, gw, c, py, px)
  zt = z.reshape(2, 2, p_l, 3, p_l, c_l).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 3, d_lat)
  xt = 1.3 * zt.astype(np.float64) @ u_cf.T.astype(np.float64)                 # (B, 2, 3, d_pix) channel-first
  want = xt.reshape(2, 2, 3, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(2, 2 * p, 3 * p, c)
  got = lift.low_rank_image(jnp.asarray(z), lift.basis_for_dit(sub, p_l), sub.scale, latent_patch_size=p_l,
                            patch_size=p)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not latent_patch_size"):
    lift.basis_for_dit(sub, 3)
