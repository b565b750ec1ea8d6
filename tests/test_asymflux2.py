"""AsymFLUX.2: a tiny latent FLUX.2 lifted into pixel space reproduces the latent model inside the
subspace at initialisation (spec section 8), checked against a float64 NumPy derivation."""

import json
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax import asymflow as af
from asymflow_jax.data import t2i
from asymflow_jax.models import asymflux2, flux2
from configs import asymflux2_klein
from tests.conftest import as_killed

LATENT = flux2.flux2_tiny()            # latent tokens of d = 8 channels, text width 24
P, C = 2, 3                            # pixel patch 2, RGB: D = 12
SCALE = 0.7


def _orthonormal(rows, cols, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
  return q.astype(np.float32)


@pytest.fixture(scope="module")
def lifted():
  latent_model = flux2.Flux2Transformer(LATENT)
  pixel_model = flux2.Flux2Transformer(asymflux2.pixel_flux2_config(LATENT, P, C))

  @jax.jit
  def random_params(key):   # every leaf N(0, 0.2^2): no zero-init layer hides a path
    leaves, treedef = jax.tree.flatten(asymflux2.init_params(latent_model, key))
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  params = random_params(jax.random.key(0))
  basis = _orthonormal(P * P * C, LATENT.in_channels, 1)
  return latent_model, pixel_model, params, basis, asymflux2.lift_flux2_params(params, basis)


def test_lift_rewrites_the_token_projections_and_fits_the_pixel_model(lifted):
  _, pixel_model, params, basis, new = lifted
  u = basis.astype(np.float64)
  np.testing.assert_allclose(new["x_embedder"]["kernel"], u @ np.asarray(params["x_embedder"]["kernel"], np.float64),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new["proj_out"]["kernel"], np.asarray(params["proj_out"]["kernel"], np.float64) @ u.T,
                             rtol=1e-5, atol=1e-7)
  want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(flux2.abstract_params(pixel_model)))
  assert jax.tree.map(lambda a: a.shape, new) == want
  assert asymflux2.patch_size_of(pixel_model, C) == P
  with pytest.raises(ValueError, match="not p\\*p\\*5"):
    asymflux2.patch_size_of(pixel_model, 5)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0])
def test_lifted_velocity_is_the_lifted_latent_velocity(lifted, sigma):
  """The latent FLUX.2 (a black box predicting the latent velocity v) sees z' = k U^T x_sigma at
  time k sigma (x1000 inside); its x0 estimate z' - k sigma v, lifted by s U, is the pixel x0_hat; the
  pixel velocity is (x_sigma - x0_hat) / sigma, and x0_hat has no component outside the subspace."""
  latent_model, pixel_model, params, basis, new = lifted
  rng = np.random.default_rng(3)
  b, h, w = 2, 4, 6                                          # 2 x 3 tokens
  x_t = rng.normal(size=(b, h, w, C)).astype(np.float32)
  prompt = rng.normal(size=(b, 3, LATENT.joint_attention_dim)).astype(np.float32)
  sig = np.full((b,), sigma, np.float32)
  u = jax.jit(lambda p, x, sg, e: asymflux2.asymflux2_apply(pixel_model, p, x, sg, e, jnp.asarray(basis),
                                                            scale=SCALE, sigma_min=1e-4))(new, x_t, sig, prompt)

  u64, s = basis.astype(np.float64), SCALE
  k = 1.0 / (s + (1 - s) * sigma)
  x_tok = np.asarray(af.patchify(jnp.asarray(x_t), P), np.float64)          # (B, 6, 12)
  z_tok = k * x_tok @ u64                                                  # (B, 6, 8)
  v = np.asarray(jax.jit(latent_model.apply)(
      {"params": params}, jnp.asarray(z_tok, jnp.float32), jnp.asarray(prompt), jnp.full((b,), k * sigma, jnp.float32),
      flux2.image_ids(h // P, w // P), flux2.text_ids(3)), np.float64)
  x0_hat = s * (z_tok - k * sigma * v) @ u64.T
  want = (x_tok - x0_hat) / sigma
  got = np.asarray(af.patchify(u, P), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  x0_model = x_tok - sigma * got
  complement = x0_model - x0_model @ u64 @ u64.T
  assert np.abs(complement).max() < 1e-4 * np.abs(x0_model).max()


def test_condition_images_are_extra_tokens_divided_by_the_scale(lifted):
  """Reference-image tokens enter x_embedder as x / s with ids T = 10; only generated tokens come out,
  and they depend on the condition (it is attended to)."""
  _, pixel_model, _, basis, new = lifted
  rng = np.random.default_rng(4)
  x_t = jnp.asarray(rng.normal(size=(1, 4, 4, C)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(1, 2, 4, C)), jnp.float32)
  prompt = jnp.asarray(rng.normal(size=(1, 2, LATENT.joint_attention_dim)), jnp.float32)
  f = jax.jit(lambda c: asymflux2.asymflux2_apply(pixel_model, new, x_t, jnp.asarray([0.5]), prompt, jnp.asarray(basis),
                                                  scale=SCALE, sigma_min=1e-4, condition_images=c))
  with_cond, other = f(cond), f(2 * cond)
  assert with_cond.shape == x_t.shape
  assert np.abs(np.asarray(with_cond - other)).max() > 1e-4


def _tiny_t2i_dataset(path, n=8, seed=5):
  """n synthetic records: 8x8 RGB images, 4x4x8 latent tokens, 3 prompt tokens of width 24."""
  rng = np.random.default_rng(seed)
  with t2i.T2IWriter(path, (8, 8), latent_downsample=P) as w:
    for i in range(n):
      w.write(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.normal(size=(4, 4, LATENT.in_channels)),
              rng.normal(size=(3, LATENT.joint_attention_dim)), f"caption {i}", num_tokens=3)
    w.finish(np.zeros((3, LATENT.joint_attention_dim), np.float32))


def tiny_asymflux2_config(data_path, base, steps):
  c = asymflux2_klein.asymflux2_config(LATENT, input_size=8)
  c.model.patch_size, c.model.dtype, c.model.remat, c.model.text_length = P, "float32", False, 3
  c.data.path, c.data.image_size = str(data_path), 8
  c.mesh.fsdp, c.batch_size, c.num_steps = 1, 2, steps
  c.warmup_steps, c.grad_clip_start, c.ema_start = 1, 1, 1
  c.vr.lpips_weight = 0.0
  c.finetune.base, c.finetune.lora_rank = str(base), 4
  c.log_every, c.checkpoint.every, c.checkpoint.async_save = 1, 1, False
  c.sample.num_steps, c.sample.num_images = 2, 2
  return c


def test_t2i_batch_spec_and_shardings(lifted, tmp_path):
  """The text-to-image batch: integer shapes (H/p tokens a side) and every key split on its leading axis."""
  from asymflow_jax import objective
  from asymflow_jax import sharding as shd
  from jax.sharding import PartitionSpec as PS
  config = tiny_asymflux2_config(tmp_path, tmp_path, 1)
  spec = objective.batch_spec(types.SimpleNamespace(config=config, model=lifted[1]))
  assert spec == dict(image=((8, 8, 3), jnp.float32), latents=((4, 4, LATENT.in_channels), jnp.float32),
                      prompt_embeds=((3, LATENT.joint_attention_dim), jnp.bfloat16), num_tokens=((), jnp.int32))
  assert all(type(n) is int for shape, _ in spec.values() for n in shape)
  mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
  specs = {k: s.spec for k, s in objective.batch_shardings(mesh, spec).items()}
  axes = shd.BATCH_AXES
  assert specs == dict(image=PS(axes, None, None, None), latents=PS(axes, None, None, None),
                       prompt_embeds=PS(axes, None, None), num_tokens=PS(axes))


def test_layer_scan_option_is_refused_for_asymflux2(tmp_path):
  # the FLUX.2 blocks are always scanned (stacked parameters); model.scan_layers is the JiT option
  from asymflow_jax import config as config_lib
  config = tiny_asymflux2_config(tmp_path, tmp_path, 1)
  config.model.scan_layers = True
  with pytest.raises(ValueError, match=r"scan_layers=True: the layer scan is implemented for the 'jit' family only"):
    config_lib.validate_config(config, num_devices=1)


def test_tiny_asymflux2_finetunes_from_records_checkpoints_and_resumes_exactly(lifted, tmp_path):
  """The whole recipe at toy size: a lifted tiny FLUX.2 saved as a base workdir, AsymFlowVR + LoRA
  (inside the scanned blocks) on synthetic t2i records; 2 straight steps == 1 step + resume (bitwise);
  the frozen teacher and the LoRA'd layers as configured; a UniPC sample grid at the end."""
  from asymflow_jax import checkpoint, trainer
  _, _, _, basis, new = lifted
  _tiny_t2i_dataset(tmp_path / "data")
  base_config = tiny_asymflux2_config(tmp_path / "data", "", 1)
  base_config.objective, base_config.finetune.trainable, base_config.finetune.lr_mults = "flow", (), ()
  base_config.finetune.lora_rank, base_config.finetune.lora_targets = 0, ()
  checkpoint.save_converted(tmp_path / "base", base_config, new, basis, SCALE)

  config = tiny_asymflux2_config(tmp_path / "data", tmp_path / "base", 2)
  no_grid = tiny_asymflux2_config(tmp_path / "data", tmp_path / "base", 2)
  no_grid.sample.num_images = 0
  straight = trainer.train(no_grid, tmp_path / "a", progress=False).state
  as_killed(tmp_path / "a", tmp_path / "b", checkpoint=1, logged=1)   # a kill during step 2, then resumed
  resumed = trainer.train(config, tmp_path / "b", progress=False).state
  for a, b in ((straight.params, resumed.params), (straight.ema, resumed.ema), (straight.opt_state, resumed.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  lora = resumed.params["lora"]
  assert lora["transformer_blocks"]["ff"]["linear_in"]["a"].shape == (LATENT.num_layers, LATENT.inner_dim, 4)
  assert lora["single_transformer_blocks"]["attn"]["to_out"]["b"].shape == (LATENT.num_single_layers, 4, LATENT.inner_dim)
  assert np.abs(np.asarray(lora["transformer_blocks"]["ff"]["linear_in"]["b"])).max() > 0   # trained
  assert set(resumed.params) == {"x_embedder", "proj_out", "norm_out", "lora"}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.frozen["params"]),
               jax.tree.map(np.asarray, new))                                                  # the teacher never moves
  metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  straight_losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [m["loss"] for m in metrics] == straight_losses                  # the same batches and noise after the restart
  assert [m["step"] for m in metrics] == [1, 2] and 0 <= metrics[-1]["vr_coef"] <= 1 and np.isfinite(metrics[-1]["loss"])
  assert (tmp_path / "b" / "samples" / "step_0000002.png").exists()

  # The sample CLI on the finetuned workdir: the dataset's first prompts, one PNG each, same as the trainer's grid
  from asymflow_jax import sample
  assert sample.main(["--workdir", str(tmp_path / "b"), "--t2i_data", str(tmp_path / "data"), "--num", "2",
                      "--out", str(tmp_path / "t2i")]) == 0
  with np.load(tmp_path / "t2i.npz") as z:
    assert z["images"].shape == (2, 8, 8, 3) and list(z["prompts"]) == ["caption 0", "caption 1"]
  assert (tmp_path / "t2i_1.png").exists()
  with pytest.raises(SystemExit):
    sample.main(["--workdir", str(tmp_path / "b"), "--t2i_data", "x", "--embeddings", "y"])

def test_lift_cli_imports_a_diffusers_folder_and_writes_a_sampleable_workdir(fixtures_dir, tmp_path):
  """lift_flux2 on the committed tiny diffusers folder and a channel-first Procrustes subspace: the
  workdir's x_embedder on DiT-packed pixel tokens equals the checkpoint's W_in on U^T of the
  channel-first tokens (packing handled), proj_out maps back through U, and the workdir opens."""
  from asymflow_jax import checkpoint, flux2_import, lift_flux2, subspace as subspace_lib
  folder = fixtures_dir / "flux2_tiny_diffusers" / "klein"
  u_cf = _orthonormal(P * P * C, LATENT.in_channels, 7)                     # rows (c, py, px)
  subspace_lib.Subspace(basis=u_cf, patch_size=P, scale=SCALE, packing="channel_first").save(str(tmp_path / "sub.npz"))
  config = asymflux2_klein.asymflux2_config(input_size=8)
  config.model.patch_size, config.model.text_length, config.data.image_size = P, 3, 8
  summary = lift_flux2.lift_to_workdir(str(folder), str(tmp_path / "sub.npz"), str(tmp_path / "wd"), config)
  assert summary["basis"] == (P * P * C, LATENT.in_channels)
  with pytest.raises(ValueError, match="already exists"):
    lift_flux2.lift_to_workdir(str(folder), str(tmp_path / "sub.npz"), str(tmp_path / "wd"), config)

  latent = flux2_import.load_diffusers_transformer(folder, flux2_import.read_diffusers_config(folder))
  _, exp, state = checkpoint.open_workdir(tmp_path / "wd")
  assert exp.config.model.flux2.num_layers == 2 and exp.config.model.rank == LATENT.in_channels
  w_in = np.asarray(latent["x_embedder"]["kernel"], np.float64)
  img = np.random.default_rng(8).normal(size=(4, 4, C))                     # one 4x4 RGB image, 4 patches
  dit = img.reshape(2, P, 2, P, C).transpose(0, 2, 1, 3, 4).reshape(4, -1)   # (py, px, c)
  cf = img.reshape(2, P, 2, P, C).transpose(0, 2, 4, 1, 3).reshape(4, -1)    # (c, py, px)
  np.testing.assert_allclose(dit @ np.asarray(state.params["x_embedder"]["kernel"], np.float64),
                             cf @ u_cf.astype(np.float64) @ w_in, rtol=1e-4, atol=1e-5)
  h = np.random.default_rng(9).normal(size=(3, LATENT.inner_dim))
  w_out = np.asarray(latent["proj_out"]["kernel"], np.float64)
  np.testing.assert_allclose(h @ np.asarray(state.params["proj_out"]["kernel"], np.float64) @ np.asarray(state.basis),
                             h @ w_out, rtol=1e-4, atol=1e-5)                 # U^T U = I on the output side
  assert float(state.scale) == pytest.approx(SCALE)
  # the rest of the tree is the checkpoint's, untouched
  np.testing.assert_array_equal(state.params["single_transformer_blocks"]["attn"]["to_out"]["kernel"],
                                latent["single_transformer_blocks"]["attn"]["to_out"]["kernel"])
