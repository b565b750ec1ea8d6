"""Finetuning a lifted model: the AsymFlowVR loss against a float64 NumPy derivation, LoRA, the
trainable subset, the lift optimiser (lr multiplier, late clipping, karras EMA)."""

import dataclasses
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax import asymflow as af
from asymflow_jax import config as config_lib
from asymflow_jax import experiment
from asymflow_jax import lift
from asymflow_jax import objective
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.evaluation import lpips
from asymflow_jax.models import asymjit, finetune, jit_model
from tests.conftest import as_killed

LATENT = jit_model.JiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                             bottleneck_dim=16, in_context_len=2, in_context_start=1, num_classes=10)
PIXEL = lift.pixel_jit_config(LATENT, 4, 1)
SCALE = 0.7
TRAINABLE = ("x_embedder", "final_layer")
LORA_TARGETS = ("mlp/w12", "mlp/w3", "t_embedder")


def lift_config(**vr):
  c = config_lib.base_config()
  c.model = config_lib.model_config("tiny", **{k: getattr(PIXEL, k) for k in (
      "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "bottleneck_dim",
      "in_context_len", "in_context_start", "num_classes")})
  c.model.rank, c.model.projected_init = LATENT.patch_dim, False
  c.data.extra_keys = ("latent",)
  c.batch_size, c.mesh.fsdp = 4, 1
  c.objective = "asymflow_vr"
  c.sigma_mean, c.sigma_std, c.sigma_shift = 0.0, 1.0, 17.0
  c.lr, c.warmup_steps, c.warmup_ratio, c.b2 = 1e-3, 2, 1e-3, 0.95
  c.grad_clip, c.grad_clip_start = 200.0, 1
  c.ema_decays, c.ema_policy, c.ema_start = (0.0,), "karras", 1
  c.finetune.base = "unused-in-memory"
  c.finetune.trainable = TRAINABLE
  c.finetune.lr_mults = (("final_layer/linear", 10.0),)
  c.finetune.lora_rank, c.finetune.lora_targets = 4, LORA_TARGETS
  c.vr.lpips_weight = 0.0
  c.vr.update(vr)
  return c


def _random_tree(tree, key, std):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _lifted(latent_config, std=0.1):
  """A lifted base (random latent weights), its subspace, a batch of images + latents."""
  latent_params = jax.jit(lambda k: _random_tree(asymjit.init_params(jit_model.JiT(latent_config), k), k, std))(
      jax.random.key(0))
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(PIXEL.patch_dim, LATENT.patch_dim)))
  basis = q.astype(np.float32)
  base = lift.lift_jit_params(latent_params, basis)
  rng = np.random.default_rng(2)
  z = rng.normal(size=(4, 8, 8, 4)).astype(np.float32)
  x0 = np.clip(np.asarray(lift.low_rank_image(jnp.asarray(z), basis, SCALE, latent_patch_size=2, patch_size=8))
               + 0.3 * rng.normal(size=(4, 32, 32, 1)), -1, 1).astype(np.float32)
  batch = dict(image=jnp.asarray(x0), label=jnp.asarray([0, 3, 7, 9], jnp.int32), latent=jnp.asarray(z))
  return base, basis, batch


@pytest.fixture(scope="module")
def setup():
  return _lifted(LATENT)


def _experiment(config):
  return experiment.build(config, shd.make_mesh(config.mesh, jax.devices()[:1]), training=True)


def _sub(basis):
  return subspace_lib.Subspace(basis=basis, patch_size=PIXEL.patch_size, scale=SCALE)


# ------------------------------------------------------------------------------------ the VR maths


def test_vr_coefficient_against_numpy():
  rng = np.random.default_rng(0)
  d_lr = rng.normal(size=(2, 8, 12, 3))
  gain = np.repeat(np.repeat(rng.normal(0.5, 1.0, size=(2, 2, 3, 3)), 4, axis=1), 4, axis=2)   # per patch
  d_full = (gain * d_lr + 0.2 * rng.normal(size=d_lr.shape)).astype(np.float32)
  d_lr = d_lr.astype(np.float32)
  coef = np.asarray(af.vr_coefficient(d_full=jnp.asarray(d_full), d_lr=jnp.asarray(d_lr), patch_size=4))
  f = d_full.astype(np.float64).reshape(2, 2, 4, 3, 4, 3)
  l = d_lr.astype(np.float64).reshape(2, 2, 4, 3, 4, 3)
  want = np.clip((f * l).mean(axis=(2, 4)) / np.maximum((l * l).mean(axis=(2, 4)), 1e-4), 0, 1)
  assert coef.shape == (2, 2, 3, 3)
  np.testing.assert_allclose(coef, want, rtol=1e-5, atol=1e-6)
  assert 0 < (coef == 0).mean() < 1 and 0 < (coef == 1).mean() < 1    # both clamps are exercised
  np.testing.assert_array_equal(af.vr_coefficient(jnp.asarray(d_full), jnp.zeros_like(d_lr), 4), 0.0)
  np.testing.assert_allclose(af.vr_coefficient(jnp.asarray(d_lr), jnp.asarray(d_lr), 4), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r"image size 8x6 is not divisible by the patch size 4"):
    af.vr_coefficient(jnp.zeros((1, 8, 6, 1)), jnp.zeros((1, 8, 6, 1)), 4)


def test_loss_shift_schedule():
  sigma = np.linspace(0, 1, 11).astype(np.float32)
  rho = np.asarray(af.loss_shift_rho(jnp.asarray(sigma), 0.3))
  s = sigma.astype(np.float64)
  np.testing.assert_allclose(rho, (1 - s) ** 2 / ((1 - s) ** 2 + (0.3 * s) ** 2), rtol=1e-6)
  assert rho[0] == 1.0 and rho[-1] == 0.0 and np.all(np.diff(rho) < 0)
  np.testing.assert_array_equal(af.loss_shift_rho(jnp.asarray(sigma), 0.0), 0.0)


def test_vr_gate_is_the_channel_rms_over_each_patch():
  coef = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 3, 2, 3)), jnp.float32)
  gate = np.asarray(af.vr_gate(coef, 4))
  want = np.sqrt((np.asarray(coef, np.float64) ** 2).mean(-1))
  assert gate.shape == (2, 12, 8)
  np.testing.assert_allclose(gate[:, ::4, ::4], want, rtol=1e-6)
  np.testing.assert_allclose(gate[:, 3::4, 3::4], want, rtol=1e-6)


@pytest.mark.parametrize("case", ["plain", "lpips", "dropout"])
def test_vr_loss_matches_a_float64_derivation(setup, case):
  """The networks are black boxes (teacher: base, eval clamp 1e-4; student: merged tree, train clamp
  1e-6; the LPIPS map); everything else — noise/label/sigma draws, x0^lr, c, rho, target, weights,
  the LPIPS gate — in NumPy. "lpips": LPIPS on the first 2 of 4 samples. "dropout": 4 blocks with
  proj_dropout and LoRA dropout, so the student must run in train mode with the module docstring's
  keys (network dropout from k_dropout, LoRA dropout from fold_in(k_dropout, 1))."""
  with_lpips, dropout = case == "lpips", case == "dropout"
  base, basis, batch = _lifted(dataclasses.replace(LATENT, depth=4), std=0.2) if dropout else setup
  config = lift_config(lpips_weight=0.7 if with_lpips else 0.0, lpips_samples=2 if with_lpips else 0)
  if dropout:
    config.model.depth, config.model.proj_dropout, config.finetune.lora_dropout = 4, 0.5, 0.5
  config.prob_class = 0.5
  exp = _experiment(config)
  model = exp.model
  trained = _random_tree(experiment.init_trained(config, base, jax.random.key(3)), jax.random.key(4), 0.05)
  key = jax.random.key(11)
  frozen = experiment.frozen_networks(config, base)
  assert ("lpips" in frozen) == with_lpips
  # XLA:CPU at the suite's optimisation level 0 runs convolutions as naive loops: optimise this jit.
  loss, aux = jax.jit(lambda t, f: objective.vr_loss(t, batch, key, jnp.asarray(basis), jnp.float32(SCALE),
                                                     model=model, config=config, frozen=f),
                      compiler_options={"xla_backend_optimization_level": 2})(trained, frozen)

  k_label, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  keep = np.asarray(jax.random.bernoulli(k_label, 0.5, (4,)))
  labels = np.where(keep, np.asarray(batch["label"]), 10)
  assert 0 < keep.sum() < 4
  n = np.asarray(jax.random.normal(k_sigma, (4,)), np.float64)
  sig = 1 / (1 + np.exp(-n))
  sig = 17 * sig / (1 + 16 * sig)
  noise = np.asarray(jax.random.normal(k_noise, (4, 32, 32, 1)), np.float64)
  z = np.asarray(batch["latent"], np.float64)
  zt = z.reshape(4, 4, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(4, 4, 4, 16)          # DiT latent tokens
  x0_lr = (SCALE * zt @ basis.T.astype(np.float64)).reshape(4, 4, 4, 8, 8, 1).transpose(0, 1, 3, 2, 4, 5)
  x0_lr = x0_lr.reshape(4, 32, 32, 1)
  x0 = np.asarray(batch["image"], np.float64)
  s4 = sig[:, None, None, None]
  x_t, x_t_lr = (1 - s4) * x0 + s4 * noise, (1 - s4) * x0_lr + s4 * noise

  def net(params, x, sigma_min, train, lora=None, rngs=None):
    def f(p, lora, xx, sg, lb):
      with finetune.lora_interceptor(scale=1.0, dropout=0.5 if rngs else 0.0):
        return asymjit.asymjit_apply(model, p, xx, sg, lb, jnp.asarray(basis), scale=SCALE, sigma_min=sigma_min,
                                     train=train, lora=lora, rngs=rngs)
    return np.asarray(jax.jit(f)(params, lora, jnp.asarray(x, jnp.float32), jnp.asarray(sig, jnp.float32),
                                 jnp.asarray(labels)), np.float64)
  x0_ref = x_t_lr - s4 * net(base, x_t_lr, 1e-4, False)
  assert experiment.lora_scale(config) == 1.0
  x0_hat = x_t - s4 * net(finetune.merge(base, trained, 1.0), x_t, 1e-6, not dropout)
  if dropout:   # the adapters by interception, with both dropouts drawn from the documented keys
    no_dropout = x0_hat   # eval mode, adapters merged
    x0_hat = x_t - s4 * net(finetune.overlay(base, trained), x_t, 1e-6, True, lora=trained[finetune.LORA],
                            rngs={"dropout": k_drop, finetune.LORA_DROPOUT: jax.random.fold_in(k_drop, 1)})
    assert np.abs(x0_hat - no_dropout).max() > 1e-2
  d_lr, d_full = x0_lr - x0_ref, x0 - x0_hat
  blocks = lambda a: a.reshape(4, 4, 8, 4, 8, 1)
  coef = np.clip((blocks(d_full * d_lr)).mean(axis=(2, 4)) / np.maximum(blocks(d_lr ** 2).mean(axis=(2, 4)), 1e-4),
                 0, 1)
  coef_px = np.repeat(np.repeat(coef, 8, axis=1), 8, axis=2)
  rho = (1 - s4) ** 2 / ((1 - s4) ** 2 + (0.3 * s4) ** 2)
  target = x0 - (1 - rho) * coef_px * d_lr
  want = 5.0 * np.mean((x0_hat - target) ** 2 / np.maximum(s4, 0.05) ** 2)
  if with_lpips:
    rgb = lambda a: jnp.repeat(jnp.asarray(a, jnp.float32), 3, axis=-1)
    dist = np.asarray(jax.jit(lpips.lpips_spatial, compiler_options={"xla_backend_optimization_level": 2})(
        frozen["lpips"], rgb(np.clip(x0_hat, -1, 1)), rgb(x0)), np.float64)                   # (B, H, W)
    gate = np.repeat(np.repeat(np.sqrt((coef ** 2).mean(-1)), 8, axis=1), 8, axis=2)
    per_lp = 0.7 * np.mean((dist * gate * (rho / np.maximum(s4, 0.05) ** 2)[..., 0])[:2], axis=(1, 2))
    assert per_lp.mean() > 1e-3 * want
    np.testing.assert_allclose(float(aux["loss_lpips"]), per_lp.mean(), rtol=1e-3)
    want += per_lp.mean()   # an unbiased estimate of the batch mean from the first 2 samples
  np.testing.assert_allclose(float(loss), want, rtol=2e-4)
  np.testing.assert_allclose(float(aux["vr_coef"]), coef.mean(), rtol=1e-3, atol=1e-5)
  assert 0 < coef.mean() < 1


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_interception_equals_the_merged_kernels_and_starts_at_the_base(setup):
  base, basis, batch = setup
  model = jit_model.JiT(PIXEL)
  x, t, y = batch["image"], jnp.asarray([0.2, 0.5, 0.7, 0.9]), batch["label"]
  apply = jax.jit(lambda p: model.apply({"params": p}, x, t, y))

  def adapted(lora, scale, dropout=0.0, seed=0):
    def f(p, lora):
      with finetune.lora_interceptor(scale=scale, dropout=dropout):
        return model.apply({"params": p, **finetune.lora_variables(lora)}, x, t, y,
                           rngs={finetune.LORA_DROPOUT: jax.random.key(seed)})
    return jax.jit(f)(base, lora)

  lora = finetune.init_lora(jax.random.key(0), base, LORA_TARGETS, 4)
  targeted = sorted(finetune._adapters(lora))
  assert targeted == ["blocks_0/mlp/w12", "blocks_0/mlp/w3", "blocks_1/mlp/w12", "blocks_1/mlp/w3",
                      "t_embedder/mlp_0", "t_embedder/mlp_2"]
  assert float(np.std(np.asarray(lora["blocks_0"]["mlp"]["w12"]["a"]))) == pytest.approx(1 / 4, rel=0.1)
  ref = apply(base)
  np.testing.assert_array_equal(adapted(lora, 1.0), ref)   # B = 0: the adapted model is the base exactly
  lora = _random_tree(lora, jax.random.key(1), 0.1)
  intercepted = adapted(lora, 0.5)
  merged = apply(finetune.merge(base, {finetune.LORA: lora}, 0.5))
  assert np.abs(np.asarray(merged - ref)).max() > 1e-2
  np.testing.assert_allclose(intercepted, merged, rtol=1e-5, atol=1e-5)
  runs = [np.asarray(adapted(lora, 0.5, dropout=0.5, seed=seed)) for seed in (0, 0, 1)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert np.abs(runs[0] - runs[2]).max() > 1e-3 and np.abs(runs[0] - np.asarray(merged)).max() > 1e-3


def test_lora_on_a_scanned_stack_adapts_each_layer_with_its_own_slice():
  """A Dense inside nn.scan sees its layer's slice of stacked adapters: equal to merging them."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(6, name="lin")(h)), None

  stack = nn.scan(Block, variable_axes={"params": 0, finetune.LORA: 0},
                  split_rngs={"params": True, finetune.LORA_DROPOUT: True}, length=3)
  model = stack()
  x = jax.random.normal(jax.random.key(0), (2, 6))
  params = model.init(jax.random.key(1), x, None)["params"]
  lora = _random_tree(finetune.init_lora(jax.random.key(2), params, ("lin",), 2), jax.random.key(3), 0.3)
  assert lora["lin"]["a"].shape == (3, 6, 2) and lora["lin"]["b"].shape == (3, 2, 6)
  with finetune.lora_interceptor(scale=0.5):
    got = model.apply({"params": params, finetune.LORA: lora}, x, None)[0]
  want = model.apply({"params": finetune.merge(params, {finetune.LORA: lora}, 0.5)}, x, None)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Hand check of layer 1 alone: kernel_1 + 0.5 a_1 b_1.
  k1 = np.asarray(params["lin"]["kernel"][1]) + 0.5 * np.asarray(lora["lin"]["a"][1]) @ np.asarray(lora["lin"]["b"][1])
  merged = finetune.merge(params, {finetune.LORA: lora}, 0.5)
  np.testing.assert_allclose(np.asarray(merged["lin"]["kernel"][1]), k1, rtol=1e-6, atol=1e-6)


def test_patterns_that_match_nothing_are_errors(setup):
  base, _, _ = setup
  finetune.check_patterns(base, TRAINABLE, LORA_TARGETS)
  with pytest.raises(ValueError, match=r"trainable pattern 'x_embeder' matches no parameter.*LoRA target 'mlp/w4'"):
    finetune.check_patterns(base, ("x_embeder",), ("mlp/w4",))


# ------------------------------------------------------------------------------------- optimiser


def test_lr_multiplier_late_clipping_and_karras_ema():
  config = lift_config()
  config.warmup_steps, config.grad_clip, config.grad_clip_start = 0, 1.0, 2
  opt = experiment.make_optimizer(config)
  params = {"final_layer": {"linear": {"kernel": jnp.ones((2,))}}, "x_embedder": {"kernel": jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: 3.0 * p, params)       # global norm 6 > 1
  state = opt.init(params)
  updates = []
  for _ in range(3):
    u, state = opt.update(grads, state, params)
    updates.append(u)
  for u in updates:   # the multiplier scales AdamW's whole step
    np.testing.assert_allclose(u["final_layer"]["linear"]["kernel"], 10 * u["x_embedder"]["kernel"], rtol=1e-6)
  # Adam normalises, so clipping shows in the second moment: steps 0-1 unclipped (|g| = 3), step 2 clipped.
  lr = config.lr
  np.testing.assert_allclose(updates[0]["x_embedder"]["kernel"], -lr, rtol=1e-5)
  g_clipped = 3.0 / 6.0
  m = 0.9 * (0.9 * (0.1 * 3) + 0.1 * 3) + 0.1 * g_clipped
  v = 0.95 * (0.95 * (0.05 * 9) + 0.05 * 9) + 0.05 * g_clipped ** 2
  want = -lr * (m / (1 - 0.9 ** 3)) / (np.sqrt(v / (1 - 0.95 ** 3)) + 1e-8)
  np.testing.assert_allclose(updates[2]["x_embedder"]["kernel"], want, rtol=1e-5)
  momenta = [float(experiment.ema_momenta(config, jnp.asarray(s))[0]) for s in range(5)]
  np.testing.assert_allclose(momenta, [0.0, 0.0, (1 - 1 / 2) ** 8, (1 - 1 / 3) ** 8, (1 - 1 / 4) ** 8], rtol=1e-6)


# --------------------------------------------------------------------------------- the train step


def test_finetune_step_trains_only_the_subset_and_never_changes_the_teacher(setup):
  base, basis, batch = setup
  config = lift_config(lpips_weight=0.0)
  config.finetune.lora_dropout = 0.05
  exp = _experiment(config)
  # The step donates its state, frozen networks included (they pass through without a copy): give it its own.
  state = exp.init_state(_sub(basis), frozen=experiment.frozen_networks(config, jax.tree.map(jnp.copy, base)))
  frozen_before = jax.tree.map(np.array, state.frozen)
  assert set(state.params) == {"x_embedder", "final_layer", finetune.LORA}
  # The optimizer and EMA hold only the trained tree.
  n_trained = sum(a.size for a in jax.tree.leaves(state.params))
  n_base = sum(a.size for a in jax.tree.leaves(base))
  assert sum(a.size for a in jax.tree.leaves(state.ema[0])) == n_trained < n_base / 2
  step = objective.jit_train_step(exp)
  first = state
  for _ in range(3):
    state, metrics = step(state, batch)
  # the step donates its input state (no second copy of the model on device), not the batch
  assert all(a.is_deleted() for a in jax.tree.leaves(first.params))
  assert not any(a.is_deleted() for a in jax.tree.leaves(batch))
  assert int(state.nonfinite_step) == -1 and np.isfinite(float(metrics["loss"]))
  assert 0 <= float(metrics["terms"]["vr_coef"]) <= 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), frozen_before)
  merged = experiment.inference_params(config, state.params, state.frozen)
  changed = set()
  for path, new in jax.tree_util.tree_leaves_with_path(merged):
    name = finetune.path_str(path)
    old = finetune._get(base, name.split("/"))
    if not np.array_equal(np.asarray(new), np.asarray(old)):
      changed.add(name)
  lora_kernels = {f"{m}/kernel" for m in finetune._adapters(state.params[finetune.LORA])}
  trainable = {p for p in finetune.leaf_paths(base) if p.startswith(TRAINABLE)}
  assert changed <= trainable | lora_kernels           # nothing else moved, not even by round-off
  assert "final_layer/linear/kernel" in changed and "x_embedder/proj1/kernel" in changed
  assert lora_kernels <= changed                       # the adapters learned (B left zero after step 1)


# ------------------------------------------------------------------------ the trainer and the workdir


def test_finetune_run_resumes_exactly_and_stores_only_the_trained_tree(setup, tmp_path):
  """train() on a lifted base workdir: 4 straight steps == 2 steps + resume to 4 (bitwise); the step
  folders hold the trained tree only; open_workdir restores it onto the base with LoRA folded in."""
  from asymflow_jax import checkpoint, trainer
  from asymflow_jax.data import sources
  base, basis, _ = setup
  base_config = lift_config()
  base_config.objective, base_config.data.extra_keys = "flow", ()
  base_config.finetune.base, base_config.finetune.trainable, base_config.finetune.lr_mults = "", (), ()
  base_config.finetune.lora_rank, base_config.finetune.lora_targets = 0, ()
  checkpoint.save_converted(tmp_path / "lifted", base_config, base, basis, SCALE)
  rng = np.random.default_rng(5)
  sources.write_npz_dataset(tmp_path / "data.npz", rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8),
                            np.arange(16) % 10, latent=rng.normal(size=(16, 8, 8, 4)).astype(np.float32))

  def config(steps, grid=True):
    c = lift_config()
    c.data.source, c.data.path = "npz", str(tmp_path / "data.npz")
    c.finetune.base = str(tmp_path / "lifted")
    c.finetune.lora_dropout = 0.05
    c.num_steps, c.log_every, c.checkpoint.every, c.checkpoint.async_save = steps, 2, 2, False
    c.sample.num_steps, c.sample.num_images, c.sample.sigma_min = 2, 10 if grid else 0, 1e-4
    return c

  straight = trainer.train(config(4, grid=False), tmp_path / "a", progress=False).state
  as_killed(tmp_path / "a", tmp_path / "b", checkpoint=2, logged=2)   # a kill during step 3, then resumed
  resumed = trainer.train(config(4), tmp_path / "b", progress=False).state
  for a, b in ((straight.params, resumed.params), (straight.ema, resumed.ema), (straight.opt_state, resumed.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  stored = (tmp_path / "b" / "checkpoints" / "4" / "params" / "_METADATA").read_text()
  assert "proj1" in stored and "lora" in stored and "qkv" not in stored and "embedding_table" not in stored
  _, _, inference = checkpoint.open_workdir(tmp_path / "b")
  want = experiment.inference_params(config(4), resumed.ema[0], dict(params=base))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7),
               inference.params, want)
  np.testing.assert_array_equal(np.asarray(inference.basis), basis)
  assert float(inference.scale) == pytest.approx(SCALE)
  metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert {"vr_coef", "loss_mse"} <= set(metrics[-1]) and 0 <= metrics[-1]["vr_coef"] <= 1


def test_config_validation_names_each_finetuning_mistake(tmp_path):
  c = lift_config()
  c.finetune.lora_targets = ()
  c.ema_decays = (0.9, 0.99)
  c.model.color_space = "oklab"
  c.data.random_flip = True
  c.vr.latent_key = "z"
  with pytest.raises(ValueError) as err:
    config_lib.validate_config(c, 1, check_files=False)
  msg = str(err.value)
  for want in ("finetune.lora_rank=4 but config.finetune.lora_targets is empty", "random_flip=True with extra_keys",
               "ema_policy='karras' keeps one EMA tree", "color_space='oklab' needs 3 channels",
               "reads the latents from batch key 'z'"):
    assert want in msg, (want, msg)
  c = lift_config()
  c.finetune.base = ""
  with pytest.raises(ValueError, match="'asymflow_vr' needs config.finetune.base"):
    config_lib.validate_config(c, 1, check_files=False)
  c = lift_config()
  c.finetune.base = str(tmp_path / "nowhere")
  c.data.source, c.data.path = "npz", str(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match=r"(?s)data.path=.*missing.npz' does not exist.*finetune.base=.*nowhere"):
    config_lib.validate_config(c, 1, check_files=True)
  c = lift_config()
  c.data.source = "npz"      # no path: needed to train, not to sample (a lifted workdir's stored config)
  config_lib.validate_config(c, 1, training=False, check_files=False)
  with pytest.raises(ValueError, match="source='npz' needs config.data.path"):
    config_lib.validate_config(c, 1, check_files=False)
  c = lift_config()
  c.finetune.trainable = ("x_embeder",)
  with pytest.raises(ValueError, match="trainable pattern 'x_embeder' matches no parameter"):
    _experiment(c)


def test_map_in_slices_keeps_each_sample_with_its_own_result():
  # slice j holds samples j, j + 3, ...; the result of sample i lands at i, values and gradients as unsliced
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2, 3)), jnp.float32)
  y = jnp.arange(6.0)[:, None, None] * jnp.ones((6, 2, 3))
  fn = lambda a, b: jnp.sin(a) * b + jnp.sum(a ** 2, axis=(1, 2), keepdims=True)   # per sample
  got = objective.map_in_slices(fn, 3, x, y)
  np.testing.assert_allclose(np.asarray(got), np.asarray(fn(x, y)), rtol=1e-6)
  g = jax.grad(lambda a: jnp.sum(objective.map_in_slices(fn, 3, a, y) ** 2))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(lambda a: jnp.sum(fn(a, y) ** 2))(x)), rtol=1e-5)
  with pytest.raises(ValueError, match="6 samples cannot be cut into 4 equal slices"):
    objective.map_in_slices(fn, 4, x, y)
  # the memory saving itself: fn is traced on one slice of 6 / slices samples (all 6 for one slice)
  for slices in (1, 2, 3, 6):
    seen = []
    objective.map_in_slices(lambda a, b: seen.append((a.shape, b.shape)) or fn(a, b), slices, x, y)
    assert seen == [((6 // slices, 2, 3), (6 // slices, 2, 3))], slices


def test_lpips_in_slices_gives_the_same_loss_and_gradient(setup):
  """vr.lpips_chunks = 2 (LPIPS on samples {0, 2} then {1, 3}, each recomputed in the backward)
  against all 4 at once: the same loss terms and gradient."""
  base, basis, batch = setup
  out = {}
  for chunks in (1, 2):
    config = lift_config(lpips_weight=0.7, lpips_samples=0)
    config.vr.lpips_chunks = chunks
    exp = _experiment(config)
    trained = _random_tree(experiment.init_trained(config, base, jax.random.key(3)), jax.random.key(4), 0.05)
    frozen = experiment.frozen_networks(config, base)
    fn = lambda t, f, exp=exp, config=config: objective.vr_loss(t, batch, jax.random.key(11), jnp.asarray(basis),
                                                                jnp.float32(SCALE), model=exp.model, config=config,
                                                                frozen=f)
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True),
                                 compiler_options={"xla_backend_optimization_level": 2})(trained, frozen)
    out[chunks] = (float(loss), float(aux["loss_lpips"]), jax.tree.leaves(grads))
  (l1, p1, g1), (l2, p2, g2) = out[1], out[2]
  assert p1 > 1e-3 * l1
  np.testing.assert_allclose([l2, p2], [l1, p1], rtol=1e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  config = lift_config(lpips_weight=0.7, lpips_samples=3)
  config.vr.lpips_chunks = 2
  with pytest.raises(ValueError, match=r"config.vr.lpips_chunks=2: expected a divisor of the 3 samples LPIPS sees"):
    config_lib.validate_config(config, num_devices=1)
