"""FLUX.2 transformer (Flax linen), matching diffusers' ``Flux2Transformer2DModel`` (spec section 11).

Conventions (as diffusers):

* ``hidden_states`` (B, N, in_channels) packed image tokens, ``encoder_hidden_states`` (B, L, joint_attention_dim)
  text features, ``timestep`` (B,) in [0, 1] (multiplied by 1000 inside), optional ``guidance`` (B,) (also x1000).
* Position ids are (T, H, W, L) per token: text (0, 0, 0, l), image (t, h, w, 0) with t = 0 for the generated
  image and 10 (i + 1) for reference image i (see :func:`text_ids`, :func:`image_ids`). The joint sequence is
  text first, then image; RoPE uses one table for it (4 axes, dims ``axes_dims_rope``, interleaved pairs).
* Output (B, N, patch_size**2 * out_channels), in ``dtype``.

Precision: parameters are ``param_dtype``; the matmuls run in ``dtype`` (e.g. bfloat16). The time embedding
(sinusoid and MLP), the modulation vectors, LayerNorm/RMSNorm, RoPE, attention logits and softmax and the
residual updates are float32 (the residual stream between blocks is stored in ``dtype``).

Layers are scanned: the double-stream blocks and the single-stream blocks are each one ``nn.scan``, so the
parameters of ``transformer_blocks`` / ``single_transformer_blocks`` carry a leading layer axis (logical name
"layers") and compile time does not grow with depth. Parameter paths mirror diffusers' module names (see
``asymflow_jax.flux2_import`` for the exact key mapping): e.g. ``transformer_blocks/attn/to_q/kernel``
(layers, in, out) <- ``transformer_blocks.{i}.attn.to_q.weight`` (out, in) transposed.

Per-block activations are sown into the "intermediates" collection when it is mutable (nothing is kept
otherwise), see :func:`apply_with_intermediates`.

Logical axis names (mapped to the mesh by ``asymflow_jax.sharding.LOGICAL_RULES``): "layers" (scan axis),
"embed" (hidden), "heads" (attention q/k/v width), "qkv" (fused single-block input projection), "mlp"
(feed-forward width), "adaln" (modulation outputs), "freq" (sinusoid features), "patch" (token channels),
"context" (text feature width), "head_dim" (q/k norm gains).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.models.activations import swiglu
from asymflow_jax.models.attention import attention
from asymflow_jax.models.layout import constrain_batch

from asymflow_jax.models.jit_model import REMAT_POLICIES

Dtype = Any

# ----------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Flux2Config:
  """Architecture hyperparameters; field names and defaults are diffusers' ``Flux2Transformer2DModel``."""

  patch_size: int = 1
  in_channels: int = 128
  out_channels: int | None = None
  num_layers: int = 8
  num_single_layers: int = 48
  attention_head_dim: int = 128
  num_attention_heads: int = 48
  joint_attention_dim: int = 15360
  timestep_guidance_channels: int = 256
  mlp_ratio: float = 3.0
  axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
  rope_theta: float = 2000
  eps: float = 1e-6
  guidance_embeds: bool = True

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                       f"{self.attention_head_dim}.")
    if any(a % 2 for a in self.axes_dims_rope):
      raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even.")
    if self.timestep_guidance_channels % 2:
      raise ValueError("timestep_guidance_channels must be even.")

  @property
  def inner_dim(self) -> int:
    """Hidden width D = heads * head_dim."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden_dim(self) -> int:
    """Feed-forward width M = int(D * mlp_ratio) (SwiGLU: the input projections are 2M wide)."""
    return int(self.inner_dim * self.mlp_ratio)

  @property
  def out_dim(self) -> int:
    """Output channels per token: patch_size**2 * (out_channels or in_channels)."""
    return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["axes_dims_rope"] = list(self.axes_dims_rope)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Flux2Config":
    """From a diffusers config.json dict: keys starting with "_" are ignored, unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown Flux2 config keys {unknown}; expected a subset of {sorted(fields)}.")
    return cls(**d)


def flux2_klein_9b(**overrides) -> Flux2Config:
  """FLUX.2 klein base 9B: 8 double + 24 single blocks, 32 heads x 128, text width 12288, 128 latent
  channels, mlp_ratio 3, RoPE theta 2000 on (32, 32, 32, 32), no guidance embedding."""
  return Flux2Config(**{**dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24,
                               attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288,
                               timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                               rope_theta=2000, eps=1e-6, guidance_embeds=False), **overrides})


def flux2_klein_4b(**overrides) -> Flux2Config:
  """FLUX.2 klein 4B: as :func:`flux2_klein_9b` with 5 double + 20 single blocks, 24 heads, text width 7680."""
  return flux2_klein_9b(**{**dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                  joint_attention_dim=7680), **overrides})


def flux2_tiny(**overrides) -> Flux2Config:
  """The parity-fixture size (tests/fixtures/flux2_tiny.json): 2 double + 2 single blocks, 2 heads x 16,
  RoPE (4, 4, 4, 4), text width 24, 8 channels, 32 sinusoid channels."""
  return Flux2Config(**{**dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                               timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                               rope_theta=2000, eps=1e-6, guidance_embeds=False), **overrides})


# ------------------------------------------------------------------------------- position ids


def text_ids(length: int) -> np.ndarray:
  """Text position ids as the klein pipeline builds them: (length, 4) int32 rows (0, 0, 0, l)."""
  ids = np.zeros((length, 4), np.int32)
  ids[:, 3] = np.arange(length)
  return ids


def image_ids(h: int, w: int, t: int = 0) -> np.ndarray:
  """Image position ids: (h*w, 4) int32 rows (t, y, x, 0) in row-major (y, x) order. t = 0 for the
  generated image, t = 10 (i + 1) for reference image i (the pipeline's ``_prepare_image_ids``)."""
  ids = np.zeros((h * w, 4), np.int32)
  ids[:, 0] = t
  ids[:, 1] = np.repeat(np.arange(h), w)
  ids[:, 2] = np.tile(np.arange(w), h)
  return ids


# ------------------------------------------------------------------------------ fixed embeddings


def timestep_features(t, dim: int, max_period: float = 10000.0):
  """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos(t f), sin(t f)],
  f_i = exp(-ln(max_period) i / (dim/2)); t (B,) already x1000; float32 (B, dim)."""
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)    # correctly rounded exp
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs)[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids, axes_dims, theta: float):
  """RoPE (cos, sin), each (S, sum(axes_dims)) float32, from ids (S, n_axes) (or (B, S, n_axes): the first
  entry's are used, as in diffusers). Axis i gets freqs theta^(-2j/d_i), j < d_i/2, each repeated twice
  (interleaved pairs); the axes are concatenated in order. Concrete ids (numpy or non-traced arrays) are
  evaluated in float64 on the host like diffusers; traced ids in float32."""
  if not isinstance(ids, jax.core.Tracer):
    pos = np.asarray(ids, np.float64)
    pos = pos[0] if pos.ndim == 3 else pos
    ang = np.concatenate([np.repeat(pos[:, i:i + 1] * (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)),
                                    2, axis=1) for i, d in enumerate(axes_dims)], axis=1)
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
  pos = ids[0] if ids.ndim == 3 else ids
  pos = pos.astype(jnp.float32)
  parts = []
  for i, d in enumerate(axes_dims):
    freqs = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    parts.append(jnp.repeat(pos[:, i:i + 1] * jnp.asarray(freqs)[None], 2, axis=1))
  ang = jnp.concatenate(parts, axis=1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  """Interleaved-pair rotation (c0 c0 c1 c1 ...): x (B, S, heads, hd) float32; cos/sin (S, hd)."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


# ------------------------------------------------------------------------------------ primitives

_kernel_init = nn.initializers.lecun_normal()


def _dense(features, names, *, dtype, param_dtype, name):
  """Bias-free nn.Dense with logical axis names (in, out) on the kernel."""
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(_kernel_init, names), name=name)


def _layer_norm(x, eps):
  """LayerNorm without affine parameters, float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _modulate(x, shift, scale):
  """x (B, S, D) float32 * (1 + scale) + shift, scale/shift (B, D) float32."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _residual(x, gate, y, dtype):
  """x + gate * y in float32, stored as ``dtype``; gate (B, D)."""
  return (x.astype(jnp.float32) + gate[:, None, :] * y.astype(jnp.float32)).astype(dtype)


class HeadRMSNorm(nn.Module):
  """Per-head RMSNorm over head_dim with a gain ("weight" in diffusers), float32: (..., hd) -> (..., hd)."""

  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    gain = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)),
                      (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * gain.astype(jnp.float32)


# --------------------------------------------------------------------------------------- modules


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2, float32: (B, channels) -> (B, D)."""

  dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    x = _dense(self.dim, ("freq", "embed"), name="linear_1", **kw)(x)
    return _dense(self.dim, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(x))


class TimeGuidanceEmbed(nn.Module):
  """temb = E_t(sinusoid(1000 t)) [+ E_g(sinusoid(1000 g))], float32 (B, D)."""

  config: Flux2Config
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep, guidance=None):
    cfg = self.config
    ch = cfg.timestep_guidance_channels
    temb = TimestepEmbedding(cfg.inner_dim, self.param_dtype, name="timestep_embedder")(
        timestep_features(timestep.astype(jnp.float32) * 1000, ch))
    if cfg.guidance_embeds and (guidance is not None or self.is_initializing()):
      g = jnp.zeros_like(timestep) if guidance is None else guidance
      gemb = TimestepEmbedding(cfg.inner_dim, self.param_dtype, name="guidance_embedder")(
          timestep_features(g.astype(jnp.float32) * 1000, ch))
      if guidance is not None:
        temb = temb + gemb
    return temb


class Modulation(nn.Module):
  """linear(silu(temb)): (B, D) -> (B, features) float32, e.g. (shift, scale, gate) x sets."""

  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb):
    return _dense(self.features, ("embed", "adaln"), dtype=jnp.float32, param_dtype=self.param_dtype,
                  name="linear")(nn.silu(temb))


class FeedForward(nn.Module):
  """SwiGLU: linear_in (D -> 2M), silu(first half) * second half, linear_out (M -> D)."""

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    m = cfg.mlp_hidden_dim
    h = _dense(2 * m, ("embed", "mlp"), name="linear_in", **kw)(x)
    h = swiglu(h)    # float32 inside, self.dtype out
    return _dense(cfg.inner_dim, ("mlp", "embed"), name="linear_out", **kw)(h)


class JointAttention(nn.Module):
  """Double-stream attention over [text; image]: separate q/k/v projections and q/k norms per stream,
  one softmax over the joint sequence. img (B, N, D), txt (B, L, D); cos/sin (L + N, hd)."""

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  batch_sharding: Any = None   # "splash": the mesh and batch axes of its shard_map

  @nn.compact
  def __call__(self, img, txt, cos, sin):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    norm = lambda name: HeadRMSNorm(cfg.eps, self.param_dtype, name=name)  # noqa: E731

    def project(x, q_name, k_name, v_name, qn_name, kn_name):
      shape = x.shape[:2] + (heads, hd)
      q = _dense(d, ("embed", "heads"), name=q_name, **kw)(x).reshape(shape)
      k = _dense(d, ("embed", "heads"), name=k_name, **kw)(x).reshape(shape)
      v = _dense(d, ("embed", "heads"), name=v_name, **kw)(x).reshape(shape)
      return norm(qn_name)(q), norm(kn_name)(k), v

    q_i, k_i, v_i = project(img, "to_q", "to_k", "to_v", "norm_q", "norm_k")
    q_t, k_t, v_t = project(txt, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
    q = apply_rope(jnp.concatenate([q_t, q_i], axis=1), cos, sin)
    k = apply_rope(jnp.concatenate([k_t, k_i], axis=1), cos, sin)
    v = jnp.concatenate([v_t, v_i], axis=1)
    out = attention(q, k, v, dtype=self.dtype, impl=self.attention_impl, sharding=self.batch_sharding)
    n_txt = txt.shape[1]
    img_out = _dense(d, ("heads", "embed"), name="to_out", **kw)(out[:, n_txt:])
    txt_out = _dense(d, ("heads", "embed"), name="to_add_out", **kw)(out[:, :n_txt])
    return img_out, txt_out


class DoubleStreamBlock(nn.Module):
  """Scan body: carry (txt (B, L, D), img (B, N, D)) -> same; mod_img/mod_txt (B, 6D) float32 shared by all
  double blocks, chunks (shift, scale, gate) for attention then for the feed-forward."""

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  batch_sharding: Any = None

  @nn.compact
  def __call__(self, carry, mod_img, mod_txt, cos, sin):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    txt, img = (constrain_batch(a, self.batch_sharding) for a in carry)
    sh_a, sc_a, g_a, sh_f, sc_f, g_f = jnp.split(mod_img, 6, axis=-1)
    csh_a, csc_a, cg_a, csh_f, csc_f, cg_f = jnp.split(mod_txt, 6, axis=-1)
    img_n = _modulate(_layer_norm(img, cfg.eps), sh_a, sc_a).astype(self.dtype)
    txt_n = _modulate(_layer_norm(txt, cfg.eps), csh_a, csc_a).astype(self.dtype)
    img_attn, txt_attn = JointAttention(cfg, attention_impl=self.attention_impl, batch_sharding=self.batch_sharding, name="attn",
                                       **kw)(
        img_n, txt_n, cos, sin)
    img = _residual(img, g_a, img_attn, self.dtype)
    img_n = _modulate(_layer_norm(img, cfg.eps), sh_f, sc_f).astype(self.dtype)
    img = _residual(img, g_f, FeedForward(cfg, name="ff", **kw)(img_n), self.dtype)
    txt = _residual(txt, cg_a, txt_attn, self.dtype)
    txt_n = _modulate(_layer_norm(txt, cfg.eps), csh_f, csc_f).astype(self.dtype)
    txt = _residual(txt, cg_f, FeedForward(cfg, name="ff_context", **kw)(txt_n), self.dtype)
    txt, img = constrain_batch(txt, self.batch_sharding), constrain_batch(img, self.batch_sharding)
    self.sow("intermediates", "txt", txt, reduce_fn=lambda _, new: new)
    self.sow("intermediates", "img", img, reduce_fn=lambda _, new: new)
    return (txt, img), None


class ParallelSelfAttention(nn.Module):
  """Single-stream "parallel" block body: to_qkv_mlp_proj (D -> 3D + 2M) split [q, k, v | gate, up];
  attention(q, k, v) and silu(gate) * up concatenated -> to_out (D + M -> D). x (B, S, D)."""

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  batch_sharding: Any = None

  @nn.compact
  def __call__(self, x, cos, sin):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, m, heads, hd = cfg.inner_dim, cfg.mlp_hidden_dim, cfg.num_attention_heads, cfg.attention_head_dim
    h = _dense(3 * d + 2 * m, ("embed", "qkv"), name="to_qkv_mlp_proj", **kw)(x)
    shape = x.shape[:2] + (heads, hd)
    q, k, v = (h[..., i * d:(i + 1) * d].reshape(shape) for i in range(3))
    q = apply_rope(HeadRMSNorm(cfg.eps, self.param_dtype, name="norm_q")(q), cos, sin)
    k = apply_rope(HeadRMSNorm(cfg.eps, self.param_dtype, name="norm_k")(k), cos, sin)
    attn = attention(q, k, v, dtype=self.dtype, impl=self.attention_impl, sharding=self.batch_sharding)
    gate, up = h[..., 3 * d:3 * d + m], h[..., 3 * d + m:]
    mlp = (nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(self.dtype)
    return _dense(d, ("mlp", "embed"), name="to_out", **kw)(jnp.concatenate([attn, mlp], axis=-1))


class SingleStreamBlock(nn.Module):
  """Scan body: x (B, L + N, D) -> same; mod (B, 3D) float32 (shift, scale, gate) shared by all single blocks."""

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  batch_sharding: Any = None

  @nn.compact
  def __call__(self, x, mod, cos, sin):
    cfg = self.config
    x = constrain_batch(x, self.batch_sharding)
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    xn = _modulate(_layer_norm(x, cfg.eps), shift, scale).astype(self.dtype)
    y = ParallelSelfAttention(cfg, self.dtype, self.param_dtype, self.attention_impl, self.batch_sharding,
                              name="attn")(xn, cos, sin)
    x = constrain_batch(_residual(x, gate, y, self.dtype), self.batch_sharding)
    self.sow("intermediates", "hidden_states", x, reduce_fn=lambda _, new: new)
    return x, None


def _scanned(block_cls, length: int, n_broadcast: int, remat: bool, remat_policy: str):
  """``block_cls`` (optionally rematerialised) scanned ``length`` times; params/intermediates stacked on axis 0."""
  if remat:
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {remat_policy!r}; choose one of {REMAT_POLICIES}.")
    block_cls = nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=False)
  # "lora": LoRA adapters of the scanned Dense layers, stacked like their kernels (models/finetune.py).
  return nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0, "lora": 0},
                 split_rngs={"params": True, "lora_dropout": True},
                 in_axes=(nn.broadcast,) * n_broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Flux2Transformer(nn.Module):
  """FLUX.2 transformer: (hidden_states (B, N, C_in), encoder_hidden_states (B, L, joint), timestep (B,),
  img_ids (N, 4), txt_ids (L, 4), guidance (B,) | None) -> (B, N, patch_size**2 * C_out) in ``dtype``.

  Attributes:
    config: a :class:`Flux2Config`.
    dtype: compute dtype of the matmuls (float32 or bfloat16); params stay ``param_dtype``.
    remat: rematerialise every block (``nn.remat`` inside the scans) with ``jax.checkpoint_policies.<remat_policy>``.
    attention_impl: "einsum" (explicit float32 softmax), "dot_product_attention" (``jax.nn.dot_product_attention``)
      or "splash" (the TPU splash kernel, per batch shard of ``batch_sharding``).
    batch_sharding: a NamedSharding whose first spec entry splits the batch (``asymflow_jax.experiment.build``
      sets it on a multi-device mesh): activations are constrained to it at every block boundary.
  """

  config: Flux2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "einsum"
  batch_sharding: Any = None

  @nn.compact
  def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
               batch_sharding=self.batch_sharding)
    b, n, c = hidden_states.shape
    if c != cfg.patch_size * cfg.patch_size * cfg.in_channels:
      raise ValueError(f"hidden_states must be (B, N, {cfg.patch_size ** 2 * cfg.in_channels}), got "
                       f"{tuple(hidden_states.shape)}.")
    n_txt = encoder_hidden_states.shape[1]
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance), (b,))

    temb = TimeGuidanceEmbed(cfg, self.param_dtype, name="time_guidance_embed")(timestep, guidance)
    self.sow("intermediates", "temb", temb, reduce_fn=lambda _, new: new)
    d = cfg.inner_dim
    mod_img = Modulation(6 * d, self.param_dtype, name="double_stream_modulation_img")(temb)
    mod_txt = Modulation(6 * d, self.param_dtype, name="double_stream_modulation_txt")(temb)
    mod_single = Modulation(3 * d, self.param_dtype, name="single_stream_modulation")(temb)

    img = constrain_batch(_dense(d, ("patch", "embed"), name="x_embedder", **kw)(hidden_states), self.batch_sharding)
    txt = constrain_batch(_dense(d, ("context", "embed"), name="context_embedder", **kw)(encoder_hidden_states),
                          self.batch_sharding)

    cos_t, sin_t = rope_tables(txt_ids, cfg.axes_dims_rope, cfg.rope_theta)
    cos_i, sin_i = rope_tables(img_ids, cfg.axes_dims_rope, cfg.rope_theta)
    if cos_t.shape[0] != n_txt or cos_i.shape[0] != n:
      raise ValueError(f"txt_ids/img_ids cover {cos_t.shape[0]}/{cos_i.shape[0]} tokens, the inputs have "
                       f"{n_txt}/{n}.")
    cos = jnp.concatenate([cos_t, cos_i], axis=0)
    sin = jnp.concatenate([sin_t, sin_i], axis=0)

    if cfg.num_layers:
      (txt, img), _ = _scanned(DoubleStreamBlock, cfg.num_layers, 4, self.remat, self.remat_policy)(
          cfg, name="transformer_blocks", **blk)((txt, img), mod_img, mod_txt, cos, sin)
    x = jnp.concatenate([txt, img], axis=1)
    if cfg.num_single_layers:
      x, _ = _scanned(SingleStreamBlock, cfg.num_single_layers, 3, self.remat, self.remat_policy)(
          cfg, name="single_transformer_blocks", **blk)(x, mod_single, cos, sin)
    img = x[:, n_txt:]

    # AdaLayerNormContinuous: (scale, shift) = linear(silu(temb)), scale first.
    scale, shift = jnp.split(Modulation(2 * d, self.param_dtype, name="norm_out")(temb), 2, axis=-1)
    img = _modulate(_layer_norm(img, cfg.eps), shift, scale).astype(self.dtype)
    self.sow("intermediates", "pre_proj_out", img, reduce_fn=lambda _, new: new)
    return constrain_batch(_dense(cfg.out_dim, ("embed", "patch"), name="proj_out", **kw)(img), self.batch_sharding)


# --------------------------------------------------------------------------------------- helpers


def dummy_inputs(config: Flux2Config, batch: int = 1, n_img: int = 4, n_txt: int = 2, guidance: bool = False):
  """Zero inputs (positional tuple + guidance kwarg dict) for init / eval_shape."""
  c = config
  args = (jnp.zeros((batch, n_img, c.patch_size ** 2 * c.in_channels), jnp.float32),
          jnp.zeros((batch, n_txt, c.joint_attention_dim), jnp.float32), jnp.zeros((batch,), jnp.float32),
          image_ids(1, n_img), text_ids(n_txt))
  return args, ({"guidance": jnp.ones((batch,), jnp.float32)} if guidance else {})


def abstract_params(model: Flux2Transformer):
  """Boxed (nn.Partitioned) parameter ShapeDtypeStructs via jax.eval_shape (no allocation)."""
  args, kwargs = dummy_inputs(model.config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]


def param_specs(model: Flux2Transformer):
  """Logical PartitionSpecs (tree like params): feed to ``asymflow_jax.sharding.logical_to_sharding``."""
  return nn.get_partition_spec(abstract_params(model))


def param_count(model_or_config) -> int:
  """Number of parameters, from shapes only."""
  model = model_or_config if isinstance(model_or_config, Flux2Transformer) else Flux2Transformer(model_or_config)
  tree = nn.meta.unbox(abstract_params(model))
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def apply_with_intermediates(model: Flux2Transformer, params, *args, **kwargs):
  """(output, intermediates): intermediates = {"temb" (B, D), "pre_proj_out" (B, N, D) (norm_out output),
  "transformer_blocks": {"txt" (num_layers, B, L, D), "img" (num_layers, B, N, D)},
  "single_transformer_blocks": {"hidden_states" (num_single_layers, B, L + N, D)}} (block outputs)."""
  out, state = model.apply({"params": params}, *args, mutable=["intermediates"], **kwargs)
  return out, dict(state["intermediates"])
