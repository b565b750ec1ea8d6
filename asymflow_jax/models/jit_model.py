"""JiT backbone (Flax linen), faithful to the reference AsymJiT forward (spec section 3).

Conventions:

* Input images are NHWC (B, H, W, C); the output is u_A tokens (B, N, D) with N = (H/p)(W/p) in
  row-major (h, w) order and D = p*p*C in DiT packing ((py, px, c), channel fastest).
* Time ``t`` is the raw calibrated time in [0, 1] (sigma * k, no x1000); labels are int (B,) with
  ``num_classes`` as the CFG null class.
* Parameters are float32 (``param_dtype``); activations run in ``dtype`` (e.g. bfloat16). RMSNorm,
  RoPE, attention logits and softmax are always float32.
* Every parameter carries logical axis names (``nn.with_logical_partitioning``); map them to a mesh
  with ``nn.logical_to_mesh_sharding(param_specs(model), mesh, rules)``. Logical names used:
  "patch" (D), "bottleneck", "embed" (hidden), "qkv" (3*hidden), "heads" (hidden after attention),
  "mlp" (SwiGLU hidden), "adaln" (adaLN outputs), "freq" (256 timestep features), "vocab" (label
  rows), "context" (in-context tokens), "head_dim" (q/k norm gains).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.asymflow import patchify
from asymflow_jax.models.activations import swiglu
from asymflow_jax.models.attention import IMPLS as ATTENTION_IMPLS, attention
from asymflow_jax.models.finetune import LORA_DROPOUT
from asymflow_jax.models.layout import constrain_batch

Dtype = Any

# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class JiTConfig:
  """Architecture hyperparameters of the JiT backbone (names follow the reference constructor)."""

  input_size: int = 256
  patch_size: int = 16
  in_channels: int = 3
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  bottleneck_dim: int = 128
  in_context_len: int = 32
  in_context_start: int = 4
  num_classes: int = 1000
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0

  def __post_init__(self):
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    if self.head_dim % 4:
      raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2-D RoPE.")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos pos-embed.")

  @property
  def grid(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def patch_dim(self) -> int:
    """D = p*p*C, the token dimension of u_A."""
    return self.patch_size * self.patch_size * self.in_channels

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def swiglu_hidden(self) -> int:
    return int(2 / 3 * int(self.hidden_size * self.mlp_ratio))

  @property
  def uses_in_context(self) -> bool:
    return self.in_context_len > 0 and self.in_context_start < self.depth

  def forward_flops(self, batch: int) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of one forward at ``batch``, with the per-sample
    conditioning (timestep MLP, adaLN); norms, RoPE and softmax are not counted."""
    h, d, n, f = self.hidden_size, self.patch_dim, self.num_patches, self.swiglu_hidden
    per_token_embed = d * self.bottleneck_dim + self.bottleneck_dim * h + h * d  # embed + final linear
    per_sample = 256 * h + h * h + self.depth * 6 * h * h + 2 * h * h  # t-MLP, block adaLN, final adaLN
    total = n * per_token_embed + per_sample
    for i in range(self.depth):
      t = n + (self.in_context_len if self.uses_in_context and i >= self.in_context_start else 0)
      total += t * (4 * h * h + 3 * h * f) + 2 * t * t * h  # qkv+proj, SwiGLU, QK^T and PV
    return 2.0 * batch * total

  def dropout_active(self, i: int) -> bool:
    """Dropout (attn/proj/SwiGLU) only in blocks depth//4 <= i < 3*(depth//4)."""
    q = self.depth // 4
    return q <= i < 3 * q

  def block_segments(self, features_after: int | None = None) -> list[tuple[int, int]]:
    """Runs [start, stop) of identical blocks (same dropout, same token count), in order: split at
    the dropout band (depth//4, 3*(depth//4)), the in-context insertion and after ``features_after``.
    The units that ``JiT(scan_layers=True)`` scans."""
    q = self.depth // 4
    cuts = {0, self.depth, q, 3 * q}
    if self.uses_in_context:
      cuts.add(self.in_context_start)
    if features_after is not None:
      cuts.add(features_after + 1)
    edges = sorted(e for e in cuts if 0 <= e <= self.depth)
    return list(zip(edges[:-1], edges[1:]))


_PRESETS = {
    # Exactly the fixture's tiny configuration (shared/fixtures/jit_tiny.json).
    "tiny": dict(input_size=32, patch_size=4, hidden_size=64, depth=4, num_heads=4, bottleneck_dim=16,
                 in_context_len=4, in_context_start=1, num_classes=10),
    # The reference constructor defaults.
    "B/16": dict(hidden_size=768, depth=12, num_heads=12, bottleneck_dim=128, in_context_len=32,
                 in_context_start=4),
    # Not configured in LakonLab; sizes follow the JiT paper (JiT-L/16).
    "L/16": dict(hidden_size=1024, depth=24, num_heads=16, bottleneck_dim=128, in_context_len=32,
                 in_context_start=8),
    # The LakonLab ImageNet-256 AsymJiT config (proj_dropout 0.2, attn_dropout 0).
    "H/16": dict(hidden_size=1280, depth=32, num_heads=16, bottleneck_dim=256, in_context_len=32,
                 in_context_start=10, proj_dropout=0.2),
}


def jit_config(name: str, **overrides) -> JiTConfig:
  """Named size presets: "tiny", "B/16", "L/16", "H/16" (input 256, patch 16, mlp_ratio 4, 1000 classes).

  "tiny" is the parity-fixture model (input 32, patch 4, hidden 64, depth 4). "B/16" is the reference
  constructor default. "L/16" is NOT configured in LakonLab and follows the JiT paper sizes
  (hidden 1024, depth 24, heads 16, bottleneck 128, in-context 32 from block 8). "H/16" is the
  LakonLab ImageNet config (incl. proj_dropout 0.2). ``overrides`` replace any field.
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown JiT size {name!r}; choose one of {sorted(_PRESETS)}.")
  return JiTConfig(**{**_PRESETS[name], **overrides})


PRESET_NAMES = tuple(_PRESETS)

# ------------------------------------------------------------------------------ fixed embeddings


def sincos_pos_embed_2d(hidden: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid*grid, hidden), tokens in row-major (h, w) order.

  The first hidden/2 channels encode the column (w) index, the last hidden/2 the row (h) index; each
  half is [sin(pos*omega), cos(pos*omega)] with omega_i = 10000^(-i/(hidden/4)).
  """
  quarter = hidden // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  hh, ww = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def one_axis(pos):
    ang = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

  return np.concatenate([one_axis(ww), one_axis(hh)], axis=1).astype(np.float32)


def rope_tables_2d(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """2-D RoPE tables (cos, sin), each (grid*grid, head_dim), adjacent-pair layout.

  Per axis r = head_dim/2 dims; freqs_j = theta^(-2j/r), j < r/2, each repeated twice (interleaved).
  The angle vector of token (h, w) is [h*freqs (r dims), w*freqs (r dims)].
  """
  r = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, r, 2, dtype=np.float64)[: r // 2] / r)
  freqs = np.repeat(freqs, 2)                                   # (r,) interleaved pairs
  pos = np.arange(grid, dtype=np.float64)
  ang_axis = pos[:, None] * freqs[None, :]                      # (grid, r)
  rows = np.broadcast_to(ang_axis[:, None, :], (grid, grid, r))
  cols = np.broadcast_to(ang_axis[None, :, :], (grid, grid, r))
  ang = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
  """[cos(t f), sin(t f)] (cos first), f_i = max_period^(-i/(dim/2)); t (B,) raw, float32 (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def apply_rope(x, cos, sin):
  """Adjacent-pair rotation: x (B, L, heads, hd) float32; cos/sin (L, hd).

  rot = (-x1, x0) per pair, written as the reversed pair times (-1, 1): the same values as stacking
  the two halves, and a cheaper program (the train step of bench/reference_config.py 3-4 % faster on CPU).
  """
  x_pairs = x.reshape(x.shape[:-1] + (-1, 2))
  rot = (x_pairs[..., ::-1] * jnp.asarray([-1.0, 1.0], x.dtype)).reshape(x.shape)
  return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


# ------------------------------------------------------------------------------------ primitives

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_normal02 = nn.initializers.normal(stddev=0.02)


def _dense(features, names, *, dtype, param_dtype, kernel_init=_xavier, use_bias=True, name=None):
  """nn.Dense with logical axis names (in, out) on the kernel and (out,) on the bias."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(_zeros, names[1:]), name=name)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * gain, computed in float32, cast to ``dtype``; gain init 1."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    gain = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                      (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * gain.astype(jnp.float32)).astype(self.dtype)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# --------------------------------------------------------------------------------------- modules


class BottleneckPatchEmbed(nn.Module):
  """Patchify -> proj1 (D -> bottleneck, no bias) -> proj2 (-> hidden, bias) -> + fixed pos-embed.

  proj1/proj2 are the reference's p x p stride-p conv and 1x1 conv written as Dense layers on DiT
  tokens: proj1 kernel (D, bottleneck) with D in (py, px, c) order.
  """

  config: JiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    tokens = patchify(x, cfg.patch_size)                         # (B, N, D)
    h = _dense(cfg.bottleneck_dim, ("patch", "bottleneck"), dtype=self.dtype, param_dtype=self.param_dtype,
               use_bias=False, name="proj1")(tokens)
    h = _dense(cfg.hidden_size, ("bottleneck", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
               name="proj2")(h)
    pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid))
    return (h.astype(jnp.float32) + pos[None]).astype(self.dtype)


class TimestepEmbedder(nn.Module):
  """256-d [cos, sin] features of raw t -> Linear -> SiLU -> Linear; (B,) -> (B, hidden)."""

  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = timestep_features(t)
    h = _dense(self.hidden_size, ("freq", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
               kernel_init=_normal02, name="mlp_0")(h)
    h = nn.silu(h)
    return _dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=_normal02, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
  """Table of num_classes + 1 rows (row num_classes = CFG null class); int (B,) -> (B, hidden)."""

  num_classes: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    table = nn.Embed(self.num_classes + 1, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(_normal02, ("vocab", "embed")),
                     name="embedding_table")
    return table(labels)


class Attention(nn.Module):
  """qkv (bias) -> per-head RMSNorm on q, k -> RoPE -> softmax(q k^T / sqrt(hd)) v -> proj.

  ``attention_impl="einsum"`` (default, the reference's maths): logits and softmax are float32
  whatever ``dtype`` is; with ``upcast_attention`` (default, as the reference's ImageNet recipe) q, k,
  v and the probabilities are float32 operands too, otherwise ``dtype`` operands with float32
  accumulation. ``"dot_product_attention"``: ``jax.nn.dot_product_attention`` on ``dtype`` operands
  (cuDNN flash attention on GPUs in bf16). ``"splash"``: the TPU splash kernel
  (:func:`attention.splash_attention`, per batch shard of ``batch_sharding``). Neither has dropout
  on the probabilities.
  """

  config: JiTConfig
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  upcast_attention: bool = True
  attention_impl: str = "einsum"
  batch_sharding: Any = None   # "splash": the mesh and batch axes of its shard_map
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, deterministic: bool):
    cfg = self.config
    b, length, _ = x.shape
    heads, hd = cfg.num_heads, cfg.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = _dense(3 * cfg.hidden_size, ("embed", "qkv"), name="qkv", **kw)(x)
    qkv = qkv.reshape(b, length, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype, axis_name="head_dim", name="q_norm")(q)
    k = RMSNorm(dtype=jnp.float32, param_dtype=self.param_dtype, axis_name="head_dim", name="k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if self.attention_impl == "einsum":
      op_dtype = jnp.float32 if self.upcast_attention else self.dtype
      logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(op_dtype), k.astype(op_dtype),
                          preferred_element_type=jnp.float32) * (hd ** -0.5)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      probs = nn.Dropout(self.attn_dropout_rate)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(op_dtype), v.astype(op_dtype),
                       preferred_element_type=jnp.float32)
      out = out.astype(self.dtype).reshape(b, length, heads * hd)
    else:
      if self.attn_dropout_rate > 0 and not deterministic:
        raise ValueError(f"attn_dropout={self.attn_dropout_rate}: dropout on the attention probabilities needs "
                         f"attention_impl='einsum', got {self.attention_impl!r}.")
      out = attention(q, k, v, dtype=self.dtype, impl=self.attention_impl, sharding=self.batch_sharding)
    out = _dense(cfg.hidden_size, ("heads", "embed"), name="proj", **kw)(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class SwiGLU(nn.Module):
  """w12 (hidden -> 2h) -> silu(first half) * second half (float32, :func:`activations.swiglu`) ->
  dropout -> w3 (h -> hidden)."""

  config: JiTConfig
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    h = self.config.swiglu_hidden
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = swiglu(_dense(2 * h, ("embed", "mlp"), name="w12", **kw)(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return _dense(self.config.hidden_size, ("mlp", "embed"), name="w3", **kw)(y)


class JiTBlock(nn.Module):
  """adaLN-Zero block: x += g_msa * Attn(mod(norm1 x)); x += g_mlp * SwiGLU(mod(norm2 x)).

  x (B, L, hidden); c (B, hidden); cos/sin (L, head_dim).
  """

  config: JiTConfig
  dropout: bool = False
  upcast_attention: bool = True
  attention_impl: str = "einsum"
  batch_sharding: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, cos, sin, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj_rate = cfg.proj_dropout if self.dropout else 0.0
    attn_rate = cfg.attn_dropout if self.dropout else 0.0
    mod = _dense(6 * cfg.hidden_size, ("embed", "adaln"), kernel_init=_zeros, name="adaLN_modulation", **kw)(
        nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = _modulate(RMSNorm(name="norm1", **kw)(x), shift_msa, scale_msa)
    h = Attention(cfg, dropout_rate=proj_rate, attn_dropout_rate=attn_rate, upcast_attention=self.upcast_attention,
                  attention_impl=self.attention_impl, batch_sharding=self.batch_sharding, name="attn", **kw)(
        h, cos, sin, deterministic)
    x = x + gate_msa[:, None, :] * h
    h = _modulate(RMSNorm(name="norm2", **kw)(x), shift_mlp, scale_mlp)
    h = SwiGLU(cfg, dropout_rate=proj_rate, name="mlp", **kw)(h, deterministic)
    return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
  """adaLN (shift, scale) -> RMSNorm -> Linear(hidden -> p*p*C); (B, N, hidden) -> (B, N, D)."""

  config: JiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = _dense(2 * cfg.hidden_size, ("embed", "adaln"), kernel_init=_zeros, name="adaLN_modulation", **kw)(
        nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = _modulate(RMSNorm(name="norm_final", **kw)(x), shift, scale)
    return _dense(cfg.patch_dim, ("embed", "patch"), kernel_init=_zeros, name="linear", **kw)(x)


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


class JiT(nn.Module):
  """JiT backbone: (x NHWC (B, H, W, C), t (B,), labels int (B,)) -> u_A tokens (B, N, D) in ``dtype``.

  ``features_after=k`` also returns the hidden state after block k (0-based), image tokens only
  (B, N, hidden) in ``dtype`` (the in-context tokens, if already inserted, are dropped): the REPA features.

  Attributes:
    config: a :class:`JiTConfig` (see :func:`jit_config`).
    dtype: compute dtype (float32 or bfloat16); params stay ``param_dtype``.
    remat: wrap every block in ``nn.remat`` with ``jax.checkpoint_policies.<remat_policy>``.
    upcast_attention: float32 q/k/v operands in attention (logits/softmax are float32 regardless).
    attention_impl: "einsum" (exact parity), "dot_product_attention" or "splash" (see :class:`Attention`).
    scan_layers: run each run of identical blocks (:meth:`JiTConfig.block_segments`) as one
      ``jax.lax.scan`` over its blocks' stacked variables (with ``remat``: the checkpointed block is
      the scan body), so the compiler sees each distinct block once. The parameter tree is the
      unrolled one (``blocks_<i>``; checkpoints, converters and LoRA targets are unchanged, and the
      option can change on resume): each step stacks the blocks' parameters (one copy, sharded as
      they are). Same values as unrolled, except that dropout draws its masks from per-block splits
      of the step's key rather than from Flax's per-module streams.
    batch_sharding: a NamedSharding whose first spec entry splits the batch (``experiment.build`` sets
      it for scanned models and for ``attention_impl="splash"`` on a multi-device mesh): the scanned
      blocks' activations are constrained to it at every block boundary (without it XLA:TPU
      replicates them inside the loop: ~1 TiB of temporaries per chip for H/16 on v5p-64), and the
      splash kernel runs per shard of it.
  """

  config: JiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  upcast_attention: bool = True
  attention_impl: str = "einsum"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  batch_sharding: Any = None

  @nn.compact
  def __call__(self, x, t, labels, *, train: bool = False, features_after: int | None = None):
    cfg = self.config
    b, h, w, ch = x.shape
    if (h, w, ch) != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(f"x must be NHWC (B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}), "
                       f"got {tuple(x.shape)}.")
    if features_after is not None and not 0 <= features_after < cfg.depth:
      raise ValueError(f"features_after={features_after}: JiT has blocks 0..{cfg.depth - 1}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    deterministic = not train

    x = BottleneckPatchEmbed(cfg, name="x_embedder", **kw)(x)
    t_emb = TimestepEmbedder(cfg.hidden_size, name="t_embedder", **kw)(t)
    y_emb = LabelEmbedder(cfg.num_classes, cfg.hidden_size, name="y_embedder", **kw)(labels)
    c = t_emb + y_emb

    cos_img, sin_img = (jnp.asarray(a) for a in rope_tables_2d(cfg.head_dim, cfg.grid))
    if cfg.uses_in_context:
      posemb = self.param("in_context_posemb", nn.with_logical_partitioning(_normal02, (None, "context", "embed")),
                          (1, cfg.in_context_len, cfg.hidden_size), self.param_dtype)
      n_ctx = cfg.in_context_len
      cos_ctx = jnp.concatenate([jnp.ones((n_ctx, cfg.head_dim), jnp.float32), cos_img], axis=0)
      sin_ctx = jnp.concatenate([jnp.zeros((n_ctx, cfg.head_dim), jnp.float32), sin_img], axis=0)

    block_cls = JiTBlock
    if self.remat:
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}.")
      # static_argnums counts self as 0: (self, x, c, cos, sin, deterministic).
      block_cls = nn.remat(JiTBlock, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                           static_argnums=(5,))
    # Initialisation always runs unrolled: it creates the per-block variables that a scan stacks.
    scan = self.scan_layers and not self.is_initializing()

    cos, sin = cos_img, sin_img
    for start, stop in cfg.block_segments(features_after):
      if cfg.uses_in_context and start == cfg.in_context_start:
        ctx = y_emb[:, None, :] + posemb.astype(self.dtype)
        x = jnp.concatenate([ctx.astype(x.dtype), x], axis=1)
        cos, sin = cos_ctx, sin_ctx
      if scan and stop - start > 1:
        x = self._scan_blocks(x, c, cos, sin, start, stop, deterministic)
      else:
        for i in range(start, stop):
          x = block_cls(cfg, dropout=cfg.dropout_active(i), name=f"blocks_{i}", **self._block_kw())(
              x, c, cos, sin, deterministic)
      if stop - 1 == features_after:
        features = x[:, x.shape[1] - cfg.num_patches:]
    if cfg.uses_in_context:
      x = x[:, cfg.in_context_len:]
    out = FinalLayer(cfg, name="final_layer", **kw)(x, c)
    return out if features_after is None else (out, features)

  def _block_kw(self) -> dict:
    return dict(upcast_attention=self.upcast_attention, attention_impl=self.attention_impl,
                batch_sharding=self.batch_sharding, dtype=self.dtype, param_dtype=self.param_dtype)

  def _scan_blocks(self, x, c, cos, sin, start: int, stop: int, deterministic: bool):
    """Blocks start..stop-1 (identical but for their variables) as one lax.scan over their stacked
    variables (every collection: params, and LoRA adapters where present) and per-block rng keys."""
    names = [f"blocks_{i}" for i in range(start, stop)]
    stacked = {}
    for col, tree in self.variables.items():
      present = [n in tree for n in names]
      if any(present) and not all(present):
        raise ValueError(f"scan_layers: collection {col!r} has variables in only some of blocks {start}..{stop - 1}; "
                         "scanned blocks need the same variables (adapt all of them, or set scan_layers=False).")
      if all(present):
        stacked[col] = jax.tree.map(lambda *a: jnp.stack(a), *[nn.meta.unbox(tree[n]) for n in names])
    keys = {s: jax.random.split(self.make_rng(s), stop - start)
            for s in ("dropout", LORA_DROPOUT) if self.has_rng(s)}
    block = JiTBlock(self.config, dropout=self.config.dropout_active(start), parent=None, **self._block_kw())

    def body(h, per_block):
      variables, rngs = per_block
      h = block.apply(variables, constrain_batch(h, self.batch_sharding), c, cos, sin, deterministic, rngs=rngs)
      return constrain_batch(h, self.batch_sharding), None

    if self.remat:
      body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, self.remat_policy), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x


# --------------------------------------------------------------------------------------- helpers


def _dummy_inputs(cfg: JiTConfig, batch: int = 1):
  x = jnp.zeros((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
  return x, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)


def abstract_params(model: JiT):
  """Boxed (nn.Partitioned) parameter ShapeDtypeStructs via jax.eval_shape (no allocation)."""
  x, t, y = _dummy_inputs(model.config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"]


def param_specs(model: JiT):
  """Logical PartitionSpecs (tree like params): feed to ``nn.logical_to_mesh_sharding``."""
  return nn.get_partition_spec(abstract_params(model))


def param_count(model: JiT) -> int:
  """Number of parameters, from shapes only."""
  tree = nn.meta.unbox(abstract_params(model))
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))
