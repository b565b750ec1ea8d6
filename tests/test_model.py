"""JiT / AsymJiT model tests against the reference fixture (tests/fixtures/jit_tiny.*, from the official code)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax import asymflow as af
from asymflow_jax.convert import _conv_patch, torch_state_dict_to_flax
from asymflow_jax.models import (JiT, abstract_params, apply_projected_init, asymjit_apply, init_params,
                                 jit_config, param_count, param_specs, projected_init_gain, zero_basis)
from asymflow_jax.models import attention as attention_lib
from asymflow_jax.models.activations import swiglu
from asymflow_jax.models.jit_model import JiTBlock, rope_tables_2d, sincos_pos_embed_2d

from tests.conftest import FIXTURES, REPO, subprocess_env

FIXTURE = FIXTURES / "jit_tiny.npz"

PARITY_RTOL = 1e-5   # max |diff| / max |ref|, float32
BF16_RTOL = 3e-2     # bf16 compute vs float32 compute, same metric


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def fixture():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=None)
def tiny():
  """(model, params, basis, scale) converted from the fixture state dict."""
  d = fixture()
  sd = {k[3:]: v for k, v in d.items() if k.startswith("sd/")}
  cfg = jit_config("tiny")
  params, basis, scale = torch_state_dict_to_flax(sd, cfg)
  params = jax.tree.map(jnp.asarray, params)
  return JiT(cfg), params, jnp.asarray(basis), scale


def inputs():
  d = fixture()
  x = jnp.asarray(d["in/x_t"].transpose(0, 2, 3, 1))   # NCHW -> NHWC
  return x, jnp.asarray(d["in/timesteps"]), jnp.asarray(d["in/class_labels"].astype(np.int32))


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------- parity


def test_converted_tree_matches_model_init():
  model, params, basis, scale = tiny()
  want = jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(abstract_params(model)))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  assert got == want
  assert basis.shape == (48, 4) and scale == 1.0


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("s", ["1", "0.8"])
def test_parity_velocity_and_u_a(mode, s):
  d = fixture()
  model, params, basis, _ = tiny()
  x, sigma, labels = inputs()
  sigma_min = af.EVAL_SIGMA_MIN if mode == "eval" else af.TRAIN_SIGMA_MIN
  fwd = jax.jit(functools.partial(asymjit_apply, model, scale=float(s), sigma_min=sigma_min,
                                  train=(mode == "train"), return_u_a=True))
  v, u_a = fwd(params, x, sigma, labels, basis)
  tag = f"{mode}_s{s}"
  assert v.shape == (6, 32, 32, 3) and v.dtype == jnp.float32
  assert _rel(v, nhwc(d[f"out/{tag}"])) <= PARITY_RTOL
  # u_A is the network output before the recovery: train and eval differ only in the recovery clamp
  # (dropout is 0 in the fixture model), so the eval reference serves both (the fixture has no
  # separate train u_A for s = 0.8; for s = 1 it has both, and they are identical).
  np.testing.assert_array_equal(d["out/u_a_packed_train_s1"], d["out/u_a_packed_eval_s1"])
  assert _rel(u_a, d[f"out/u_a_packed_eval_s{s}"]) <= PARITY_RTOL


def test_intermediates_match_reference():
  d = fixture()
  model, params, _, _ = tiny()
  x, sigma, labels = inputs()
  k, t = af.calibrate(sigma, 1.0)
  u_a, state = jax.jit(lambda p: model.apply({"params": p}, k[:, None, None, None] * x, t, labels,
                                             capture_intermediates=True, mutable=["intermediates"]))(params)
  mid = state["intermediates"]
  got = {"x_embed": mid["x_embedder"]["__call__"][0], "t_embed": mid["t_embedder"]["__call__"][0],
         "y_embed": mid["y_embedder"]["__call__"][0], "u_a_packed": u_a}
  for i in range(4):
    got[f"block{i}"] = mid[f"blocks_{i}"]["__call__"][0]
  assert got["block0"].shape == (6, 64, 64) and got["block1"].shape == (6, 68, 64)
  for name, value in got.items():
    ref = d[f"mid_eval_s1/{name}"]
    assert value.shape == ref.shape, name
    assert _rel(value, ref) <= PARITY_RTOL, name


def test_fixed_buffers_match_reference():
  d = fixture()
  cos, sin = rope_tables_2d(16, 8)
  for name in ("feat_rope", "feat_rope_incontext"):
    np.testing.assert_allclose(cos, d[f"sd/{name}.base_rope.freqs_cos"], atol=1e-6)
    np.testing.assert_allclose(sin, d[f"sd/{name}.base_rope.freqs_sin"], atol=1e-6)
  np.testing.assert_allclose(sincos_pos_embed_2d(64, 8)[None], d["sd/x_embedder.pos_embed"], atol=1e-6)


def test_rank0_basis_is_jit_x0_prediction():
  model, params, _, _ = tiny()
  x, sigma, labels = inputs()
  basis0 = zero_basis(model.config)
  v, u_a = jax.jit(lambda p: asymjit_apply(model, p, x, sigma, labels, basis0, sigma_min=af.EVAL_SIGMA_MIN,
                                           return_u_a=True))(params)
  # r = 0: u_A = -x0, so x0_hat = -u_A and u = (x_t - x0_hat) / max(sigma, sigma_min).
  x0_hat = -np.asarray(u_a, np.float64)
  xt = np.asarray(af.patchify(x, 4), np.float64)
  sc = np.maximum(np.asarray(sigma, np.float64), af.EVAL_SIGMA_MIN)[:, None, None]
  want = af.unpatchify(jnp.asarray((xt - x0_hat) / sc, jnp.float32), 4, 32, 32)
  assert _rel(v, want) <= 1e-6
  assert float(jnp.max(jnp.abs(u_a))) > 0.1   # the fixture network output is non-trivial


# ------------------------------------------------------------------------------------------ init


def test_projected_init_matches_fixture():
  d = fixture()
  model, params, basis, _ = tiny()
  cfg = model.config
  new = apply_projected_init(params, basis, cfg)
  want = _conv_patch(d["init/proj1_weight_after_projected_init"])    # (D, bottleneck)
  got = np.asarray(new["x_embedder"]["proj1"]["kernel"])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got[:, :4], np.sqrt(2 * 48 / (48 + 16)) * np.asarray(basis), atol=1e-6)
  assert projected_init_gain(jit_config("H/16")) == pytest.approx(np.sqrt(1.5))
  with pytest.raises(ValueError, match="bottleneck"):
    apply_projected_init(params, jnp.eye(48, 17), cfg)


def test_fresh_init_follows_spec():
  model, _, basis, _ = tiny()
  params = jax.jit(lambda k: init_params(model, k, basis))(jax.random.key(0))
  leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  leaves = {"/".join(p.key for p in path): np.asarray(v) for path, v in leaves.items()}
  for name, v in leaves.items():
    if name.endswith("/bias") or "adaLN_modulation" in name or name.startswith("final_layer/linear"):
      assert np.all(v == 0), name
    elif name.endswith("/scale"):
      assert np.all(v == 1), name
  for name in ("y_embedder/embedding_table/embedding", "t_embedder/mlp_0/kernel", "t_embedder/mlp_2/kernel",
               "in_context_posemb"):
    assert abs(leaves[name].std() - 0.02) < 0.004, name
  qkv = leaves["blocks_0/attn/qkv/kernel"]                  # xavier-uniform (64 -> 192)
  limit = np.sqrt(6 / (64 + 192))
  assert np.abs(qkv).max() <= limit and abs(qkv.std() - limit / np.sqrt(3)) < 0.1 * limit
  np.testing.assert_allclose(leaves["x_embedder/proj1/kernel"][:, :4], projected_init_gain(model.config) * basis,
                             atol=1e-6)


def test_every_param_has_logical_axes():
  model = JiT(jit_config("tiny"))
  boxed = abstract_params(model)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  specs = param_specs(model)
  assert tuple(specs["blocks_0"]["attn"]["qkv"]["kernel"]) == ("embed", "qkv")
  assert tuple(specs["y_embedder"]["embedding_table"]["embedding"]) == ("vocab", "embed")


# -------------------------------------------------------------------------------- compute options


def test_bf16_compute_close_to_fp32():
  d = fixture()
  model, params, basis, _ = tiny()
  x, sigma, labels = inputs()
  model16 = JiT(model.config, dtype=jnp.bfloat16)
  v, u_a = jax.jit(lambda p: asymjit_apply(model16, p, x, sigma, labels, basis, sigma_min=af.EVAL_SIGMA_MIN,
                                           return_u_a=True))(params)
  assert u_a.dtype == jnp.bfloat16 and v.dtype == jnp.float32
  err = _rel(u_a, d["out/u_a_packed_eval_s1"])
  assert 1e-4 < err <= BF16_RTOL          # really ran in bf16, and stays close
  assert _rel(v, nhwc(d["out/eval_s1"])) <= BF16_RTOL
  # bf16 attention operands (float32 logits/softmax accumulation) stay within the same tolerance.
  model16b = JiT(model.config, dtype=jnp.bfloat16, upcast_attention=False)
  u_a_b = jax.jit(lambda p: model16b.apply({"params": p}, x, sigma, labels))(params)
  assert 1e-4 < _rel(u_a_b, d["out/u_a_packed_eval_s1"]) <= BF16_RTOL


def test_dot_product_attention_matches_the_einsum_path(monkeypatch):
  # jax.nn.dot_product_attention (cuDNN flash attention on GPUs) against the reference fixture, float32 and bf16
  calls = []
  fused_op = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or fused_op(*a, **k))
  d = fixture()
  model, params, _, _ = tiny()
  x, sigma, labels = inputs()
  ref = d["out/u_a_packed_eval_s1"]
  fused = JiT(model.config, attention_impl="dot_product_attention")
  assert _rel(jax.jit(lambda p: fused.apply({"params": p}, x, sigma, labels))(params), ref) <= PARITY_RTOL
  fused16 = JiT(model.config, dtype=jnp.bfloat16, attention_impl="dot_product_attention")
  u16 = jax.jit(lambda p: fused16.apply({"params": p}, x, sigma, labels))(params)
  assert u16.dtype == jnp.bfloat16 and 1e-4 < _rel(u16, ref) <= BF16_RTOL
  # every block went through it, in both traces: block 0 on the 64 image tokens, blocks 1-3 with the 4 in-context ones
  assert calls == 2 * ([(6, 64, 4, 16)] + 3 * [(6, 68, 4, 16)])
  # dropout on the attention probabilities exists only in the einsum path
  drop = JiT(jit_config("tiny", attn_dropout=0.1), attention_impl="dot_product_attention")
  with pytest.raises(ValueError, match=r"attn_dropout=0.1: dropout on the attention probabilities needs "
                                       r"attention_impl='einsum'"):
    drop.apply({"params": params}, x, sigma, labels, train=True, rngs={"dropout": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"attention_impl='flash': expected one of \('einsum', 'dot_product_attention', "
                                       r"'splash'\)"):
    JiT(model.config, attention_impl="flash").apply({"params": params}, x, sigma, labels)


@pytest.mark.parametrize("seq", [68, 128])   # padded to 128 with masked keys / no padding
def test_splash_attention_matches_softmax_attention_and_its_gradient(seq):
  """The TPU splash kernel (Pallas interpreter on CPU) against softmax attention written out in
  float64 NumPy: values, and the gradients of a random projection of the output w.r.t. q, k, v."""
  rng = np.random.default_rng(seq)
  b, h, d = 2, 3, 16
  q, k, v = (rng.standard_normal((b, seq, h, d)) for _ in range(3))
  cot = rng.standard_normal((b, seq, h * d))
  got = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, dtype=jnp.float32, impl="splash"))(
      *(jnp.asarray(t, jnp.float32) for t in (q, k, v)))
  # float64: p = softmax(q k^T / sqrt d) over keys, o = p v; backward of L = <o, cot>
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  assert got.shape == (b, seq, h * d)
  np.testing.assert_allclose(np.asarray(got), o.reshape(b, seq, h * d), atol=2e-6)
  g_o = cot.reshape(b, seq, h, d)
  g_v = np.einsum("bhqk,bqhd->bkhd", p, g_o)
  g_p = np.einsum("bqhd,bkhd->bhqk", g_o, v)
  g_logits = p * (g_p - (g_p * p).sum(-1, keepdims=True))
  g_q = np.einsum("bhqk,bkhd->bqhd", g_logits, k) / np.sqrt(d)
  g_k = np.einsum("bhqk,bqhd->bkhd", g_logits, q) / np.sqrt(d)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention_lib.attention(q, k, v, dtype=jnp.float32, impl="splash")
                                                   * cot), argnums=(0, 1, 2)))(
      *(jnp.asarray(t, jnp.float32) for t in (q, k, v)))
  for g, want, name in zip(grads, (g_q, g_k, g_v), "qkv"):
    np.testing.assert_allclose(np.asarray(g), want, atol=5e-6, err_msg=name)


def test_splash_attention_in_the_model_matches_the_fixture(monkeypatch):
  """JiT with attention_impl='splash' against the reference fixture (float32), every block through the
  kernel; a GPU platform is refused with a pointer to the cuDNN path."""
  calls = []
  splash = attention_lib.splash_attention
  monkeypatch.setattr(attention_lib, "splash_attention", lambda *a, **k: calls.append(a[0].shape) or splash(*a, **k))
  d = fixture()
  model, params, _, _ = tiny()
  x, sigma, labels = inputs()
  fused = JiT(model.config, attention_impl="splash")
  assert _rel(jax.jit(lambda p: fused.apply({"params": p}, x, sigma, labels))(params),
              d["out/u_a_packed_eval_s1"]) <= PARITY_RTOL
  assert calls == [(6, 64, 4, 16)] + 3 * [(6, 68, 4, 16)]
  monkeypatch.setattr(attention_lib, "_platform", lambda sharding: "gpu")
  with pytest.raises(ValueError, match=r"attention_impl='splash' is a TPU kernel \(the devices here are 'gpu'\); "
                                       r"on GPUs use 'dot_product_attention'"):
    fused.apply({"params": params}, x, sigma, labels)


def test_swiglu_value_and_gradient_against_float64():
  # the hand-written VJP of activations.swiglu against the derivative worked out in float64 NumPy:
  # y = a s(a) b, dy/da = s(a) (1 + a (1 - s(a))) b, dy/db = a s(a), s = sigmoid
  rng = np.random.default_rng(0)
  h = rng.normal(0, 3, (2, 5, 2 * 7))
  h[0, 0, :3] = [-40.0, 0.0, 40.0]         # saturated sigmoid and zero gate
  g = rng.normal(0, 1, (2, 5, 7))
  a, b = h[..., :7], h[..., 7:]
  s = 1 / (1 + np.exp(-a))
  want_y = a * s * b
  want_dh = np.concatenate([g * b * s * (1 + a * (1 - s)), g * a * s], axis=-1)
  y, vjp = jax.vjp(swiglu, jnp.asarray(h, jnp.float32))
  (dh,) = vjp(jnp.asarray(g, jnp.float32))
  assert y.dtype == dh.dtype == jnp.float32
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dh, want_dh, rtol=1e-5, atol=1e-5)
  # bf16 in, bf16 out (float32 inside): within bf16 rounding of the float64 values
  y16, vjp16 = jax.vjp(swiglu, jnp.asarray(h, jnp.bfloat16))
  (dh16,) = vjp16(jnp.asarray(g, jnp.bfloat16))
  assert y16.dtype == dh16.dtype == jnp.bfloat16
  assert _rel(y16, want_y) <= 2e-2 and _rel(dh16, want_dh) <= 2e-2
  with pytest.raises(ValueError, match=r"swiglu: the last axis must hold two halves \[gate, up\], got shape \(2, 3\)"):
    swiglu(jnp.zeros((2, 3)))


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_matches_plain(policy):
  # Two blocks of the fixture network (in-context tokens from block 1) keep the compile cheap.
  _, full, _, _ = tiny()
  params = {k: v for k, v in full.items() if k not in ("blocks_2", "blocks_3")}
  model = JiT(jit_config("tiny", depth=2))
  x, sigma, labels = inputs()
  remat_model = JiT(model.config, remat=True, remat_policy=policy)

  def loss(p, m):
    return jnp.mean(jnp.square(m.apply({"params": p}, x, sigma, labels)))

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, remat_model)))(params)
  assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(a)) + 1e-30))
  with pytest.raises(ValueError, match="remat_policy"):
    JiT(model.config, remat=True, remat_policy="bogus").apply({"params": params}, x, sigma, labels)


def test_block_segments_are_the_runs_of_identical_blocks():
  # by hand from the rules: cut at depth//4 and 3*(depth//4) (the dropout band), at the in-context
  # insertion and after the REPA block
  h16 = jit_config("H/16")                      # depth 32: band 8..24, in-context from block 10
  assert h16.block_segments() == [(0, 8), (8, 10), (10, 24), (24, 32)]
  assert h16.block_segments(7) == h16.block_segments()          # the paper's REPA block ends a run already
  assert h16.block_segments(12) == [(0, 8), (8, 10), (10, 13), (13, 24), (24, 32)]
  assert jit_config("B/16").block_segments() == [(0, 3), (3, 4), (4, 9), (9, 12)]
  assert jit_config("tiny", in_context_len=0).block_segments() == [(0, 1), (1, 3), (3, 4)]
  assert jit_config("tiny", depth=2).block_segments() == [(0, 1), (1, 2)]   # depth//4 = 0: no band


def _perturbed(params, std=0.05):
  """Init parameters plus noise: the zero-initialised adaLN gates and output layer would hide the blocks."""
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [a + std * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


SCAN_CFG = jit_config("tiny", depth=6)   # runs (0, 1) (1, 3) (3, 6); with features after 3: (3, 4) (4, 6)


def _scan_case(model, params):
  """(u_A, REPA features after block 3, lowered forward text, gradient of a mean-square loss) of ``model``."""
  x, sigma, labels = inputs()
  lowered = jax.jit(lambda p: model.apply({"params": p}, x, sigma, labels, features_after=3)).lower(params)
  u, f = lowered.compile()(params)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, sigma, labels)))))(params)
  return u, f, lowered.as_text(), grads


@functools.lru_cache(maxsize=None)
def _unrolled_scan_reference():
  """Perturbed parameters of SCAN_CFG and the unrolled model's results on them (shared by both remat cases)."""
  x, sigma, labels = inputs()
  params = _perturbed(JiT(SCAN_CFG).init(jax.random.key(0), x, sigma, labels)["params"])
  return params, _scan_case(JiT(SCAN_CFG), params)


@pytest.mark.parametrize("remat", [False, True])
def test_layer_scan_matches_unrolled(remat):
  x, sigma, labels = inputs()
  params, (u0, f0, text0, g0) = _unrolled_scan_reference()
  scanned = JiT(SCAN_CFG, scan_layers=True, remat=remat)
  assert set(scanned.init(jax.random.key(0), x, sigma, labels)["params"]) == set(params)   # same tree
  u1, f1, text1, g1 = _scan_case(scanned, params)
  assert _rel(u1, u0) <= 1e-5 and _rel(f1, f0) <= 1e-5 and float(jnp.max(jnp.abs(u0))) > 1e-2
  # the scanned program really loops: one while per run of >= 2 blocks, none unrolled
  assert text1.count("stablehlo.while") == 2 and "stablehlo.while" not in text0
  assert jax.tree.structure(g0) == jax.tree.structure(g1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a)) + 1e-30),
                               err_msg=jax.tree_util.keystr(path))


def test_layer_scan_dropout_and_lora():
  from asymflow_jax.models import finetune
  cfg = jit_config("tiny", depth=6, proj_dropout=0.5)   # the scanned dropout band: blocks 1..2
  x, sigma, labels = inputs()
  plain, scanned = JiT(cfg), JiT(cfg, scan_layers=True)
  params = _perturbed(plain.init(jax.random.key(0), x, sigma, labels)["params"])

  @jax.jit
  def train(p, key):
    return scanned.apply({"params": p}, x, sigma, labels, train=True, rngs={"dropout": key})

  ev = jax.jit(lambda p: scanned.apply({"params": p}, x, sigma, labels))(params)
  a, b, c = train(params, jax.random.key(1)), train(params, jax.random.key(1)), train(params, jax.random.key(2))
  assert _rel(a, ev) > 1e-2 and _rel(c, a) > 1e-2        # dropout acts in the scanned band, drawn from the key
  np.testing.assert_array_equal(a, b)

  # LoRA adapters on every block's qkv (the interceptor sees the scanned blocks' stacked "lora" collection)
  lora = finetune.init_lora(jax.random.key(3), params, [r"blocks_\d+/attn/qkv$"], rank=2)
  lora = jax.tree.map(lambda t: t + 0.1, lora)           # B = 0 at init would make the adapters invisible

  def adapted(m, lo, lora_dropout=0.0, key=jax.random.key(4)):
    with finetune.lora_interceptor(scale=2.0, dropout=lora_dropout):
      return jax.jit(lambda p: m.apply({"params": p, "lora": lo}, x, sigma, labels,
                                       rngs={finetune.LORA_DROPOUT: key}))(params)

  with_lora = adapted(scanned, lora)
  assert _rel(with_lora, adapted(plain, lora)) <= 1e-5 and _rel(with_lora, ev) > 1e-2
  assert _rel(adapted(scanned, lora, 0.5), with_lora) > 1e-2   # the LoRA dropout stream reaches the scan
  some = {k: v for k, v in lora.items() if k != "blocks_4"}
  with pytest.raises(ValueError, match=r"'lora' has variables in only some of blocks 3..5"):
    adapted(scanned, some)


def test_dropout_only_in_middle_blocks():
  model, params, _, _ = tiny()
  cfg = jit_config("tiny", proj_dropout=0.5, attn_dropout=0.5)
  h = jax.random.normal(jax.random.key(1), (2, 68, 64))
  c = jax.random.normal(jax.random.key(2), (2, 64))
  cos, sin = (jnp.asarray(a) for a in rope_tables_2d(16, 8))
  cos = jnp.concatenate([jnp.ones((4, 16)), cos]); sin = jnp.concatenate([jnp.zeros((4, 16)), sin])
  x, sigma, labels = inputs()
  m = JiT(cfg)

  @jax.jit
  def run(params):
    pairs = []
    for i in range(4):
      block = JiTBlock(cfg, dropout=cfg.dropout_active(i))
      p = {"params": params[f"blocks_{i}"]}
      pairs.append((block.apply(p, h, c, cos, sin, True),
                    block.apply(p, h, c, cos, sin, False, rngs={"dropout": jax.random.key(3)})))
    full = (m.apply({"params": params}, x, sigma, labels),
            m.apply({"params": params}, x, sigma, labels, train=True, rngs={"dropout": jax.random.key(0)}))
    return pairs, full

  pairs, (ev, tr) = run(params)
  changed = [not np.allclose(a, b) for a, b in pairs]
  assert changed == [False, True, True, False]      # depth 4: depth//4 = 1 <= i < 3
  assert not np.allclose(ev, tr)                    # the train flag reaches the blocks


def test_fixture_has_no_dropout_effect_in_train_mode():
  # The fixture config has zero dropout: train-mode u_A equals eval-mode u_A (as in the reference).
  d = fixture()
  model, params, basis, _ = tiny()
  x, sigma, labels = inputs()
  _, u_a = jax.jit(lambda p: asymjit_apply(model, p, x, sigma, labels, basis, sigma_min=af.TRAIN_SIGMA_MIN,
                                           train=True, return_u_a=True))(params)
  assert _rel(u_a, d["out/u_a_packed_train_s1"]) <= PARITY_RTOL


# ---------------------------------------------------------------------------------- sharded (FSDP)

_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from asymflow_jax import asymflow as af
    from asymflow_jax.convert import load_state_dict, torch_state_dict_to_flax
    from asymflow_jax.models import JiT, asymjit_apply, jit_config, param_specs
    fixture = sys.argv[1]
    cfg = jit_config("tiny"); model = JiT(cfg)
    params, basis, scale = torch_state_dict_to_flax(load_state_dict(fixture), cfg)
    d = np.load(fixture)
    x = jnp.asarray(d["in/x_t"].transpose(0, 2, 3, 1)); sigma = jnp.asarray(d["in/timesteps"])
    labels = jnp.asarray(d["in/class_labels"].astype(np.int32))
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("embed", "fsdp"),)
    shardings = nn.logical_to_mesh_sharding(param_specs(model), mesh, rules)
    sharded = jax.device_put(params, shardings)
    rep = NamedSharding(mesh, P())
    fwd = lambda p, x, s, y: asymjit_apply(model, p, x, s, y, jnp.asarray(basis), sigma_min=af.EVAL_SIGMA_MIN)
    out = jax.jit(fwd, in_shardings=(shardings, rep, rep, rep), out_shardings=rep)(sharded, x, sigma, labels)
    plain = jax.jit(fwd)(jax.tree.map(jnp.asarray, params), x, sigma, labels)
    scanned = JiT(cfg, scan_layers=True)   # blocks 1..2 scanned over their stacked, FSDP-sharded params
    fwd_scan = lambda p, x, s, y: asymjit_apply(scanned, p, x, s, y, jnp.asarray(basis), sigma_min=af.EVAL_SIGMA_MIN)
    out_scan = jax.jit(fwd_scan, in_shardings=(shardings, rep, rep, rep), out_shardings=rep)(sharded, x, sigma, labels)
    qkv = sharded["blocks_0"]["attn"]["qkv"]["kernel"]
    ref = d["out/eval_s1"].transpose(0, 2, 3, 1)
    print(json.dumps({
        "devices": jax.device_count(),
        "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
        "qkv_spec": [str(a) for a in qkv.sharding.spec],
        "rel_vs_plain": float(np.max(np.abs(np.asarray(out) - np.asarray(plain))) / np.max(np.abs(plain))),
        "rel_vs_ref": float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref))),
        "rel_scan_vs_ref": float(np.max(np.abs(np.asarray(out_scan) - ref)) / np.max(np.abs(ref))),
    }))
""")


def test_fsdp_sharded_forward_on_8_fake_devices():
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(FIXTURE)], env=subprocess_env(8), capture_output=True,
                        text=True, timeout=300, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["devices"] == 8
  assert res["qkv_spec"][0] == "fsdp" and res["qkv_shard_shape"] == [8, 192]   # 64 / 8 rows per device
  assert res["rel_vs_plain"] <= 1e-5
  assert res["rel_vs_ref"] <= PARITY_RTOL and res["rel_scan_vs_ref"] <= PARITY_RTOL


# ------------------------------------------------------------------------------------ large sizes


def _expected_param_count(h, depth, bottleneck, ctx, p=16, c=3, classes=1000, mlp_ratio=4.0):
  """Independent count from the architecture description (without the q/k norm gains)."""
  d = p * p * c
  hid = int(2 / 3 * int(h * mlp_ratio))
  block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 2 * hid + 2 * hid) + (hid * h + h) + (h * 6 * h + 6 * h) + 2 * h
  return (d * bottleneck + bottleneck * h + h + 256 * h + h + h * h + h + (classes + 1) * h + ctx * h
          + depth * block + h + (h * d + d) + (h * 2 * h + 2 * h))


@pytest.mark.parametrize("name,h,depth,heads,bottleneck", [
    ("B/16", 768, 12, 12, 128), ("L/16", 1024, 24, 16, 128), ("H/16", 1280, 32, 16, 256)])
def test_preset_param_counts(name, h, depth, heads, bottleneck):
  cfg = jit_config(name)
  assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.bottleneck_dim) == (h, depth, heads, bottleneck)
  assert (cfg.input_size, cfg.patch_size, cfg.num_classes, cfg.in_context_len) == (256, 16, 1000, 32)
  n = param_count(JiT(cfg))
  # q/k norm gains: 2 * head_dim per block.
  want = _expected_param_count(h, depth, bottleneck, 32) + depth * 2 * (h // heads)
  assert n == want
  # JiT paper: B/16 131M, L/16 459M, H/16 953M.
  assert round(n / 1e6) == {"B/16": 131, "L/16": 459, "H/16": 953}[name]


def test_b16_init_and_jitted_forward():
  cfg = jit_config("B/16")
  model = JiT(cfg)
  rng = np.random.default_rng(0)
  basis = jnp.asarray(np.linalg.qr(rng.normal(size=(768, 8)))[0], jnp.float32)
  # 130M random draws and a 256x256 forward: at the suite's XLA optimisation level 0 running them
  # costs more than compiling them at level 2
  optimised = {"xla_backend_optimization_level": 2}
  params = jax.jit(lambda k: init_params(model, k, basis), compiler_options=optimised)(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 256, 256, 3))
  sigma = jnp.array([0.5, 0.02], jnp.float32)
  labels = jnp.array([3, 1000], jnp.int32)
  fwd = jax.jit(lambda p, x, s, y: asymjit_apply(model, p, x, s, y, basis, sigma_min=af.EVAL_SIGMA_MIN,
                                                 return_u_a=True), compiler_options=optimised)
  v, u_a = fwd(params, x, sigma, labels)
  assert v.shape == (2, 256, 256, 3) and u_a.shape == (2, 256, 768)
  # Zero-initialised final layer: u_A = 0, so u = (I - Pi) x_t / max(sigma, sigma_min).
  assert float(jnp.max(jnp.abs(u_a))) == 0.0
  xt = np.asarray(af.patchify(x, 16), np.float64)
  b64 = np.asarray(basis, np.float64)
  comp = xt - xt @ b64 @ b64.T
  want = comp / np.maximum(np.asarray(sigma, np.float64), af.EVAL_SIGMA_MIN)[:, None, None]
  assert _rel(af.patchify(v, 16), want) <= 1e-5
