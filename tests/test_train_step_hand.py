"""``train_step`` on a tiny AsymJiT against a float64 NumPy hand computation (spec section 4).

Nothing here calls the project's ``sample_sigma``, ``flow_loss``, ``lr_schedule``, ``make_optimizer``
(except to build the optimizer *under test*) or optax to compute an expectation. The only project
pieces used as building blocks are the network forward ``asymjit_apply`` and its VJP (``jax.vjp``
with a cotangent computed in NumPy), and ``init_params`` for parameter *shapes* (the values are
drawn here, so that every parameter, incl. the zero-initialised adaLN and final layers, gets a
gradient).

PRNG convention reproduced (one step, from ``state.rng`` and ``state.step``)::

    key, next_rng = split(state.rng)
    key = fold_in(key, state.step)
    k_label, k_sigma, k_noise, k_drop = split(key, 4)
    keep  = bernoulli(k_label, prob_class, (B,))       labels -> where(keep, label, num_classes)
    n     = normal(k_sigma, (B,))                      sigma from n (below)
    noise = normal(k_noise, x0.shape, float32)         eps
    k_drop: the network's dropout rng (dropout is inactive in this depth-2 model, passed anyway)

Hand formulas (spec section 4), all float64:

    s = sigmoid(mean + std n);  sigma = clip(shift s / (1 + (shift - 1) s), 1e-4, 1)
    x_t = (1 - sigma) x0 + sigma eps;  u = AsymJiT(x_t) (train mode, recovery clamp 1e-6)
    w = sigma / max(sigma, 0.05);  L = mean((w (u - (eps - x0)))^2)
    g <- g min(1, c / ||g||)  (global-norm clip);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p <- p - lr_i (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd p)
    lr_i = lr (frac + (1 - frac) warmup_ratio), frac = min(i / warmup_steps, 1)   (i = state.step)
    ema_j <- d_j ema_j + (1 - d_j) p_new  for every decay d_j

Tests (one compiled train step, config below, shared by all of them):

1. sigma draws at the 1e-4 floor / inside the 0.05 weight clamp / above it; loss, gradient norm and
   per-sigma-bucket metrics and the first parameter update against the hand loss.
2. label dropout: the labels the network receives (recorded by a probe) are the reproduced
   bernoulli(prob_class) draws with dropped ones = the null class; kept fraction ~ prob_class.
3. AdamW (b1 != b2, eps, weight decay, bias correction), the warm-up lr at steps 0 and 1 (inside)
   and 2, 3 (after), global-norm clipping active (steps 0-2) and inactive (step 3).
4. both EMA trees: ema <- d ema + (1 - d) p_new (decays 0.25 and 0.9).
5. non-finite steps are skipped bit for bit and recorded, and ``save_checkpoint`` refuses them:
   (a) NaN loss (a NaN pixel); (b) NaN gradient with a finite loss (the probe's fault injection);
   (c) overflowing update with a finite loss and gradient (a 1e30 entry in a label-embedding row the
   batch never reads: weight decay makes an update whose global norm overflows to inf).

Tolerances come from float32 round-off only (never from outputs of the code under test).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np
import pytest

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- project API (aliases)
# Every use of the project goes through these names; re-point them here if the package moves.
from asymflow_jax.models import asymjit as _asymjit
from tests.train_config import tiny_train_config

from asymflow_jax import checkpoint as _checkpoint, experiment as _experiment, objective as _objective
TrainState = _experiment.TrainState
train_step = _objective.train_step              # (state, batch, *, model, config, optimizer)
train_steps = _objective.train_steps            # K steps in one call: batch leaves (K, B, ...)
model_from_config = _experiment.model_from_config
make_optimizer = _experiment.make_optimizer     # only to build the optimizer under test
checkpoint_manager = _checkpoint.manager        # (workdir, config) -> orbax CheckpointManager
save_checkpoint = _checkpoint.save_train        # (mngr, state, data_state, *, force)
asymjit_apply = _asymjit.asymjit_apply          # the network forward, a building block of the hand check
init_params = _asymjit.init_params              # only for parameter shapes (jax.eval_shape)

# ------------------------------------------------------------------------------ spec constants
SIGMA_FLOOR = 1e-4        # sigma clipped to [1e-4, 1]
LOSS_SIGMA_MIN = 0.05     # w = sigma / max(sigma, 0.05)
TRAIN_SIGMA_MIN = 1e-6    # recovery clamp in training

B, SIZE = 16, 8           # batch, image side (8x8x1, patch 4 -> 4 tokens of D = 16)
NUM_CLASSES = 10          # tiny_train_config (MNIST); the null class is index 10
POISON_LABEL = 9          # reserved: ordinary batches use labels 0..8 (see _ProbeModel)
IMAGE_SCALE = 8.0         # x0 ~ U(-8, 8): large gradients (clip active); x0 = 0: small ones (inactive)
GRAD_CLIP = 40.0
F32_EPS = 2.0 ** -23      # float32 unit round-off is 2^-24; this is 2 of them
# Bound on the float32 error of one gradient entry (two float32 backward passes of the same maths
# accumulate in different orders): 1e-5 of the entry plus 1e-6 (~16 ulps) of the leaf's largest entry.
G_RTOL, G_ATOL = 1e-5, 1e-6

# Faster XLA:CPU compiles for the two big programs compiled here (codegen only; no fast-math).
_FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def _config():
  c = tiny_train_config()
  c.model.input_size = SIZE
  c.data.image_size = SIZE
  c.batch_size = B
  # sigma: logit-normal far to the left and shifted, so a batch has sigmas at the 1e-4 floor,
  # strictly between the floor and the 0.05 loss-weight clamp, and above the clamp.
  c.sigma_mean, c.sigma_std, c.sigma_shift = -7.0, 4.0, 3.0
  c.sigma_clip_min, c.loss_sigma_min = SIGMA_FLOOR, LOSS_SIGMA_MIN
  c.prob_class = 0.75
  # AdamW with non-default, distinct betas, non-zero weight decay and an active gradient clip.
  c.lr, c.warmup_steps, c.warmup_ratio = 1e-2, 2, 0.1
  c.b1, c.b2, c.eps, c.weight_decay = 0.7, 0.9, 1e-5, 0.1
  c.grad_clip = GRAD_CLIP
  c.ema_decays = (0.25, 0.9)   # 0.5 would be symmetric: d e + (1-d) p == e + (p - e) d only at d = 0.5
  c.checkpoint.every, c.checkpoint.keep, c.checkpoint.keep_every, c.checkpoint.async_save = 1, 10, 0, False
  return c


# ------------------------------------------------------------------------------------- helpers


@jax.custom_vjp
def _nan_grad_if(x, trigger):
  return x


def _nan_grad_if_fwd(x, trigger):
  return x, trigger


def _nan_grad_if_bwd(trigger, g):
  return jnp.where(trigger, jnp.nan, 1.0).astype(g.dtype) * g, None


_nan_grad_if.defvjp(_nan_grad_if_fwd, _nan_grad_if_bwd)


class _ProbeModel:
  """Transparent stand-in for the backbone handed to ``train_step``.

  Forwards every attribute to the real module and changes nothing in the forward pass. It records
  the labels each forward receives (host callback), and -- fault injection for the non-finite
  test -- multiplies the backward by NaN when a received label is ``POISON_LABEL`` (by 1.0, exactly,
  otherwise): a finite loss with a NaN gradient, which the real model has no clean way to produce.
  """

  def __init__(self, inner):
    self._inner = inner
    self.seen_labels = []

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def _record(self, labels):
    self.seen_labels.append(np.asarray(labels))

  def apply(self, variables, x, t, labels, *args, **kwargs):
    jax.debug.callback(self._record, labels)
    out = self._inner.apply(variables, x, t, labels, *args, **kwargs)
    return _nan_grad_if(out, jnp.any(labels == POISON_LABEL))


class Draws(NamedTuple):
  keep: np.ndarray
  n: np.ndarray
  noise: np.ndarray
  k_drop: jax.Array
  next_rng: jax.Array


def reproduce_draws(state, batch, prob_class) -> Draws:
  key, next_rng = jax.random.split(state.rng)
  key = jax.random.fold_in(key, int(state.step))
  k_label, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  b = batch["label"].shape[0]
  keep = np.asarray(jax.random.bernoulli(k_label, prob_class, (b,)))
  n = np.asarray(jax.random.normal(k_sigma, (b,)), np.float64)
  noise = np.asarray(jax.random.normal(k_noise, batch["image"].shape, jnp.float32), np.float64)
  return Draws(keep, n, noise, k_drop, next_rng)


def hand_sigma(n, c):
  s = 1.0 / (1.0 + np.exp(-(c.sigma_mean + c.sigma_std * n)))
  shift = c.sigma_shift
  return np.clip(shift * s / (1.0 + (shift - 1.0) * s), SIGMA_FLOOR, 1.0)


def hand_lr(c, i):
  frac = min(i / c.warmup_steps, 1.0)
  return c.lr * (frac + (1.0 - frac) * c.warmup_ratio)


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _bits(tree):
  return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def _key_bits(key):
  return np.asarray(jax.random.key_data(key)).tobytes()


class HandLoss(NamedTuple):
  loss: float
  per_sample: np.ndarray
  sigma: np.ndarray
  labels: np.ndarray
  grads: list


class HandAdamW:
  """Clip-by-global-norm + AdamW + the warm-up schedule, float64, with a per-element error bound."""

  def __init__(self, c, params):
    self.c = c
    self.m = [np.zeros_like(p) for p in _f64(params)]
    self.v = [np.zeros_like(p) for p in _f64(params)]
    self.t = 0
    self.err = [0.0 for _ in self.m]   # per-entry bound on the gradient error, summed over the history

  def step(self, params, grads, i):
    c = self.c
    self.t += 1
    gnorm = np.sqrt(sum(np.sum(g * g) for g in grads))
    factor = c.grad_clip / gnorm if 0 < c.grad_clip <= gnorm else 1.0
    lr = hand_lr(c, i)
    want, tol = [], []
    for j, (p, g) in enumerate(zip(_f64(params), grads)):
      g = g * factor
      self.err[j] = self.err[j] + G_RTOL * np.abs(g) + G_ATOL * np.abs(g).max(initial=0.0)
      self.m[j] = c.b1 * self.m[j] + (1 - c.b1) * g
      self.v[j] = c.b2 * self.v[j] + (1 - c.b2) * g * g
      m_hat = self.m[j] / (1 - c.b1 ** self.t)
      v_hat = self.v[j] / (1 - c.b2 ** self.t)
      denom = np.sqrt(v_hat) + c.eps
      direction = m_hat / denom
      upd = lr * (direction + c.weight_decay * p)
      want.append(p - upd)
      # |d direction / d g_s| <= ~2 / denom for each history gradient g_s (b1, b2 here): 4x margin.
      dir_err = 4.0 * self.err[j] / denom
      tol.append(lr * (dir_err + 1e-5 * (np.abs(direction) + c.weight_decay * np.abs(p)))
                 + F32_EPS * np.maximum(np.abs(p), np.abs(p - upd)))
    return want, tol, gnorm, factor, lr


def assert_close_leaves(got_tree, want, tol, what):
  __tracebackhide__ = True
  for j, (got, w, t) in enumerate(zip(_f64(got_tree), want, tol)):
    bad = np.abs(got - w) > t
    if bad.any():
      k = np.argmax(np.abs(got - w) - t)
      raise AssertionError(f"{what}: leaf {j} {got.shape}: {bad.sum()} of {bad.size} entries off; worst "
                           f"got {got.flat[k]!r} want {w.flat[k]!r} tol {np.broadcast_to(t, got.shape).flat[k]!r}")


# -------------------------------------------------------------------------------------- set-up


class Setup(NamedTuple):
  config: object
  model: object
  probe: _ProbeModel
  optimizer: object
  step: object            # the compiled train step (probe model)
  hand: object            # compiled (u, vjp(cot)) of the plain model
  state0: TrainState


def _batch(rng, scale=IMAGE_SCALE, labels=None):
  images = (scale * rng.uniform(-1, 1, (B, SIZE, SIZE, 1))).astype(np.float32)
  labels = rng.integers(0, POISON_LABEL, B) if labels is None else labels
  return dict(image=jnp.asarray(images), label=jnp.asarray(labels, jnp.int32))


def _compile_step(probe, config, optimizer, state, batch):
  fn = jax.jit(functools.partial(train_step, model=probe, config=config, optimizer=optimizer))
  return fn.lower(state, batch).compile(compiler_options=_FAST_COMPILE)


def _initial_state(params, ema, optimizer, basis, scale, rng):
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params),
                    ema=ema, rng=rng, basis=basis, scale=jnp.asarray(scale, jnp.float32),
                    nonfinite_step=jnp.asarray(-1, jnp.int32), nonfinite_kind=jnp.asarray(0, jnp.int32))


@pytest.fixture(scope="module")
def setup():
  c = _config()
  model = model_from_config(c)
  assert model.config.num_classes == NUM_CLASSES
  probe = _ProbeModel(model)
  optimizer = make_optimizer(c)
  rng = np.random.default_rng(0)
  d = model.config.patch_dim
  basis = jnp.asarray(np.linalg.qr(rng.standard_normal((d, c.model.rank)))[0], jnp.float32)
  shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
  # EMA trees start away from the parameters, so the decay is visible from the first step.
  ema = tuple(jax.tree.map(lambda p: p + jnp.asarray(0.01 * rng.standard_normal(p.shape), p.dtype), params)
              for _ in c.ema_decays)
  state0 = _initial_state(params, ema, optimizer, basis, 0.8, jax.random.key(7))
  example = _batch(rng)
  step = _compile_step(probe, c, optimizer, state0, example)

  def fwd_vjp(params, x_t, sigma, labels, k_drop, basis, scale, cot):
    f = lambda p: asymjit_apply(model, p, x_t, sigma, labels, basis, scale=scale, sigma_min=TRAIN_SIGMA_MIN,
                                train=True, rngs={"dropout": k_drop})
    u, vjp = jax.vjp(f, params)
    return u, vjp(cot)[0]

  zeros = jnp.zeros((B, SIZE, SIZE, 1), jnp.float32)
  hand = jax.jit(fwd_vjp).lower(params, zeros, jnp.full((B,), 0.5, jnp.float32), example["label"],
                                jax.random.key(0), basis, state0.scale, zeros).compile(compiler_options=_FAST_COMPILE)
  return Setup(c, model, probe, optimizer, step, hand, state0)


def hand_loss_and_grad(s: Setup, state, batch, draws: Draws) -> HandLoss:
  x0 = np.asarray(batch["image"], np.float64)
  labels = np.where(draws.keep, np.asarray(batch["label"]), NUM_CLASSES)
  sigma = hand_sigma(draws.n, s.config)
  sb = sigma[:, None, None, None]
  x_t = (1 - sb) * x0 + sb * draws.noise
  args = (state.params, jnp.asarray(x_t, jnp.float32), jnp.asarray(sigma, jnp.float32),
          jnp.asarray(labels, jnp.int32), draws.k_drop, state.basis, state.scale)
  u, _ = s.hand(*args, jnp.zeros(x0.shape, jnp.float32))
  u = np.asarray(u, np.float64)
  w = (sigma / np.maximum(sigma, LOSS_SIGMA_MIN))[:, None, None, None]
  resid = w * (u - (draws.noise - x0))
  cot = 2.0 * w * resid / resid.size
  _, grads = s.hand(*args, jnp.asarray(cot, jnp.float32))
  return HandLoss(float(np.mean(resid ** 2)), np.mean(resid ** 2, axis=(1, 2, 3)), sigma, labels, _f64(grads))


def run_step(s: Setup, step_fn, state, batch):
  s.probe.seen_labels.clear()
  new, metrics = step_fn(state, batch)
  jax.block_until_ready((new, metrics))
  jax.effects_barrier()
  return new, jax.device_get(metrics)


@pytest.fixture(scope="module")
def trajectory(setup):
  """Four hand-checked steps: 0, 1 inside the warm-up, 2, 3 after it; clip active at 0-2, inactive at 3."""
  s = setup
  rng = np.random.default_rng(1)
  adam = HandAdamW(s.config, s.state0.params)
  state, records = s.state0, []
  for scale in [IMAGE_SCALE, IMAGE_SCALE, IMAGE_SCALE, 0.0]:
    batch = _batch(rng, scale)
    draws = reproduce_draws(state, batch, s.config.prob_class)
    hand = hand_loss_and_grad(s, state, batch, draws)
    want, tol, gnorm, factor, lr = adam.step(state.params, hand.grads, int(state.step))
    new, metrics = run_step(s, s.step, state, batch)
    records.append(dict(state=state, batch=batch, draws=draws, hand=hand, want=want, tol=tol, gnorm=gnorm,
                        factor=factor, lr=lr, new=new, metrics=metrics, seen=list(s.probe.seen_labels)))
    state = new
  return records


# ---------------------------------------------------------------------------------------- tests


def test_sigma_draws_and_weighted_loss(trajectory):
  sigma = trajectory[0]["hand"].sigma
  # the batch covers the floor (exactly 1e-4), the (1e-4, 0.05) weight ramp and w = 1
  at_floor = np.float32(sigma) == np.float32(SIGMA_FLOOR)
  assert at_floor.sum() >= 2, sigma
  assert ((sigma > SIGMA_FLOOR * 1.01) & (sigma < LOSS_SIGMA_MIN)).sum() >= 2, sigma
  assert (sigma >= LOSS_SIGMA_MIN).sum() >= 1, sigma
  for rec in trajectory:
    m, h = rec["metrics"], rec["hand"]
    # float32 forward + a mean of B*H*W*C = 1024 squares: relative error far below 1e-5
    np.testing.assert_allclose(float(m["loss"]), h.loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), rec["gnorm"], rtol=1e-5)
    # per-sigma-bucket means and counts of the per-sample losses
    edges = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    idx = np.clip(np.searchsorted(edges, h.sigma, side="right") - 1, 0, 3)
    counts = np.bincount(idx, minlength=4)
    np.testing.assert_array_equal(np.asarray(m["count_by_sigma"]), counts)
    means = np.bincount(idx, weights=h.per_sample, minlength=4) / np.maximum(counts, 1)
    np.testing.assert_allclose(np.asarray(m["loss_by_sigma"], np.float64), means, rtol=1e-5, atol=0)
  # the resulting parameter update of the first step (its gradient is that of the weighted loss)
  assert_close_leaves(trajectory[0]["new"].params, trajectory[0]["want"], trajectory[0]["tol"], "step 1 params")
  # the weight matters in this batch: with w = 1 the loss would be far larger
  d = trajectory[0]
  unweighted = np.mean((d["hand"].per_sample / (d["hand"].sigma / np.maximum(d["hand"].sigma, 0.05)) ** 2))
  assert unweighted > 10 * d["hand"].loss


def test_label_dropout_reaches_the_model(setup, trajectory):
  s = setup
  # 1) in the hand-checked steps the model saw exactly the reproduced labels
  for rec in trajectory:
    assert rec["seen"], "the probe recorded no forward pass"
    for seen in rec["seen"]:
      np.testing.assert_array_equal(seen, rec["hand"].labels)
  # 2) statistics over many steps: kept fraction ~ prob_class, dropped labels = the null class
  rng = np.random.default_rng(2)
  state, kept, total = trajectory[-1]["new"], 0, 0
  for _ in range(40):
    batch = _batch(rng, 1.0)
    draws = reproduce_draws(state, batch, s.config.prob_class)
    state, _ = run_step(s, s.step, state, batch)
    labels = np.asarray(batch["label"])
    seen = s.probe.seen_labels[0]
    assert all(np.array_equal(x, seen) for x in s.probe.seen_labels)
    kept_here = seen == labels
    assert np.all(seen[~kept_here] == NUM_CLASSES)      # every dropped label is the null class
    np.testing.assert_array_equal(kept_here, draws.keep)  # and exactly the reproduced bernoulli draws
    kept += int(kept_here.sum())
    total += labels.size
  p = s.config.prob_class
  sd = np.sqrt(total * p * (1 - p))
  assert abs(kept - p * total) < 5 * sd, (kept, total, p)


def test_adamw_warmup_and_clip(setup, trajectory):
  c = setup.config
  # schedule: steps 0, 1 inside the warm-up (frac 0, 1/2), 2, 3 after it
  assert [r["lr"] for r in trajectory] == pytest.approx([c.lr * c.warmup_ratio, c.lr * (0.5 + 0.5 * c.warmup_ratio),
                                                         c.lr, c.lr], rel=1e-12)
  for r in trajectory:
    np.testing.assert_allclose(float(r["metrics"]["lr"]), r["lr"], rtol=1e-6)
  # the clip is active (by a clear margin) at steps 0-2 and inactive at step 3
  assert all(r["gnorm"] > 1.5 * GRAD_CLIP for r in trajectory[:3]), [r["gnorm"] for r in trajectory]
  assert trajectory[3]["gnorm"] < GRAD_CLIP / 1.5, trajectory[3]["gnorm"]
  for i, r in enumerate(trajectory):
    assert_close_leaves(r["new"].params, r["want"], r["tol"], f"params after step {i + 1}")
    assert int(r["new"].step) == i + 1 and int(r["new"].nonfinite_step) == -1
    assert _key_bits(r["new"].rng) == _key_bits(r["draws"].next_rng)


def test_every_ema_tree(setup, trajectory):
  decays = setup.config.ema_decays
  for i, r in enumerate(trajectory):
    assert len(r["new"].ema) == len(decays)
    p_new = _f64(r["new"].params)
    for d, e_old, e_new in zip(decays, r["state"].ema, r["new"].ema):
      e_old = _f64(e_old)
      want = [d * e + (1 - d) * p for e, p in zip(e_old, p_new)]
      tol = [2 * F32_EPS * (np.abs(e) + np.abs(p)) for e, p in zip(e_old, p_new)]   # ~4 float32 roundings
      assert_close_leaves(e_new, want, tol, f"ema decay {d} after step {i + 1}")


def _assert_skipped(before, after):
  assert _bits(after.params) == _bits(before.params), "params changed in a skipped step"
  assert _bits(after.opt_state) == _bits(before.opt_state), "optimizer state changed in a skipped step"
  assert len(after.ema) == len(before.ema)
  for j, (e_after, e_before) in enumerate(zip(after.ema, before.ema)):
    assert _bits(e_after) == _bits(e_before), f"EMA tree {j} changed in a skipped step"
  assert int(after.step) == int(before.step) + 1
  assert int(after.nonfinite_step) == int(before.step) + 1   # the (1-based) number of the skipped step


def _with_huge_unused_label_row(state):
  """The same state with row POISON_LABEL of the label-embedding table (the only leaf with num_classes + 1
  rows) set to 1e30. Batches without that label never read the row: the loss and every gradient stay
  finite (the row's gradient is exactly 0), but weight decay makes its update ~lr wd 1e30, whose square
  overflows float32, so the update's global norm is inf (the same overflow as an absurd lr, without
  compiling a second program)."""
  leaves, treedef = jax.tree.flatten(state.params)
  rows = [i for i, x in enumerate(leaves) if x.ndim == 2 and x.shape[0] == NUM_CLASSES + 1]
  assert len(rows) == 1, [x.shape for x in leaves]
  leaves[rows[0]] = leaves[rows[0]].at[POISON_LABEL].set(1e30)
  return state.replace(params=jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("case", ["nan_loss", "nan_grad", "overflowing_update"])
def test_nonfinite_step_is_skipped_and_not_saved(setup, trajectory, case, tmp_path):
  s = setup
  config, step_fn = s.config, s.step
  rng = np.random.default_rng(3)
  before = trajectory[0]["new"]   # step 1 (inside the warm-up), a finite state
  if case == "overflowing_update":
    before = _with_huge_unused_label_row(trajectory[2]["new"])   # step 3 (after the warm-up)
    batch = _batch(rng)
  else:
    if case == "nan_loss":
      batch = _batch(rng)
      image = np.array(batch["image"])
      image[3, 2, 5, 0] = np.nan
      batch["image"] = jnp.asarray(image)
    else:
      batch = _batch(rng, labels=np.full(B, POISON_LABEL))
      assert reproduce_draws(before, batch, config.prob_class).keep.any()   # the poison label reaches the model
  after, metrics = run_step(s, step_fn, before, batch)
  if case == "nan_loss":
    assert np.isnan(metrics["loss"])
  else:
    # the loss is the ordinary, finite one
    hand = hand_loss_and_grad(s, before, batch, reproduce_draws(before, batch, config.prob_class))
    np.testing.assert_allclose(float(metrics["loss"]), hand.loss, rtol=1e-5)
    if case == "nan_grad":
      assert np.isnan(metrics["grad_norm"])
    else:
      # so is the gradient; only the update's norm overflows
      gnorm = np.sqrt(sum(np.sum(g * g) for g in hand.grads))
      np.testing.assert_allclose(float(metrics["grad_norm"]), gnorm, rtol=1e-5)
      lr = hand_lr(config, int(before.step))
      assert (lr * config.weight_decay * 1e30) ** 2 > float(np.finfo(np.float32).max)   # its square overflows float32
  _assert_skipped(before, after)
  # what was not finite is recorded (bits: 1 loss, 2 gradient, 4 update); a NaN loss makes every later
  # quantity NaN too, a NaN gradient also the update
  want_kind = {"nan_loss": 1 | 2 | 4, "nan_grad": 2 | 4, "overflowing_update": 4}[case]
  assert int(after.nonfinite_kind) == want_kind
  assert _key_bits(after.rng) == _key_bits(jax.random.split(before.rng)[1])
  # a second non-finite step keeps the first step number
  again, _ = run_step(s, step_fn, after, batch)
  assert int(again.nonfinite_step) == int(after.nonfinite_step) and int(again.step) == int(after.step) + 1
  assert _bits(again.params) == _bits(before.params), "params changed in a second skipped step"

  # a real orbax manager: a finite state saves, the non-finite one raises and writes nothing
  mngr = checkpoint_manager(str(tmp_path), config)
  try:
    assert save_checkpoint(mngr, before, dict(iterator=""), force=True)
    mngr.wait_until_finished()
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / str(int(before.step))).is_dir()
    what = {"nan_loss": "loss and gradient and update", "nan_grad": "gradient and update",
            "overflowing_update": "update"}[case]
    with pytest.raises(FloatingPointError, match=f"non-finite {what} at step {int(after.nonfinite_step)}"):
      save_checkpoint(mngr, after, dict(iterator=""), force=True)
    mngr.wait_until_finished()
    assert not (ckpt / str(int(after.step))).exists()
    assert sorted(os.listdir(ckpt)) == [str(int(before.step))]
  finally:
    mngr.close()


def test_k_steps_in_one_call_are_k_single_steps(setup, trajectory):
  """``train_steps`` (config.steps_per_call: a lax.scan over K stacked batches) makes the updates of K
  single-step calls: the hand-checked four steps, and a NaN batch inside a call skips that step
  only (the steps after it train on; the record names it)."""
  s = setup
  fn = jax.jit(functools.partial(train_steps, model=s.probe, config=s.config, optimizer=s.optimizer))
  stack = lambda batches: {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}
  final, metrics = fn(s.state0, stack([r["batch"] for r in trajectory]))
  want = trajectory[-1]["new"]
  assert int(final.step) == 4 and int(final.nonfinite_step) == -1
  assert _key_bits(final.rng) == _key_bits(want.rng)
  for got, ref, what in [(final.params, want.params, "params"), (final.opt_state, want.opt_state, "optimizer"),
                         (final.ema, want.ema, "ema")]:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=what)
  assert np.asarray(metrics["loss"]).shape == (4,)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), [r["metrics"]["loss"] for r in trajectory], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["lr"]), [r["metrics"]["lr"] for r in trajectory], rtol=1e-7)

  rng = np.random.default_rng(5)
  batches = [_batch(rng) for _ in range(4)]
  image = np.array(batches[1]["image"])
  image[0, 1, 2, 0] = np.nan
  batches[1]["image"] = jnp.asarray(image)
  single = [s.state0]
  for b in batches:
    single.append(run_step(s, s.step, single[-1], b)[0])
  final, metrics = fn(s.state0, stack(batches))
  nan_loss = np.isnan(np.asarray(metrics["loss"]))
  assert nan_loss.tolist() == [False, True, False, False]
  assert int(final.nonfinite_step) == int(single[-1].nonfinite_step) == 2 and int(final.step) == 4
  assert int(final.nonfinite_kind) == int(single[-1].nonfinite_kind) == 1 | 2 | 4
  assert _bits(single[2].params) == _bits(single[1].params)   # (the single calls skipped step 2 too)
  for g, w in zip(jax.tree.leaves((final.params, final.ema)), jax.tree.leaves((single[-1].params, single[-1].ema))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
  # steps 3 and 4 did train: the result is not the state after step 1
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(single[1].params))) > 1e-4
