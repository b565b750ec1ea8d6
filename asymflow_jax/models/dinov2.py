"""DINOv2 ViT (Flax linen), matching Hugging Face ``transformers``' ``Dinov2Model`` and
``Dinov2WithRegistersModel`` (5.x; spec sections 5 and 11).

Forward (as transformers):

* ``pixel_values`` NHWC (B, H, W, C) (already normalised; the HF processor's ImageNet mean/std is the caller's
  job). A ``patch_size`` strided conv (VALID: trailing rows/columns that do not fill a patch are dropped, like
  torch's conv) gives the (H // p) x (W // p) patch tokens, row-major.
* Optional ``bool_masked_pos`` (B, N): masked patch tokens are replaced by ``mask_token``.
* ``[CLS; patches] + position embeddings``; the learned table covers the native grid
  ``image_size // patch_size`` (square). Any other grid uses HF's ``interpolate_pos_encoding``: torch
  ``F.interpolate(mode="bicubic", align_corners=False, size=(h, w))`` of the patch table, in float32 (the CLS row
  is kept). Plain DINOv2 has ``antialias=False`` (Keys cubic, A = -0.75, border replicated); the
  with-registers model ``antialias=True`` (torch's antialiased path: A = -0.5, the kernel widened by the scale
  when downsampling, window clipped at the border and renormalised). Both are exact matrix products here
  (:func:`bicubic_resize_matrix`); ``jax.image.resize`` matches neither. transformers 5.x passes an explicit
  ``size`` (no scale factors, no +0.1 offset), so the source coordinate is ``(i + 0.5) * in / out - 0.5``.
* Register tokens (with-registers model) are inserted after CLS, after the position embeddings:
  ``[CLS; registers; patches]``.
* ``num_hidden_layers`` pre-norm blocks: ``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``, the MLP
  ``fc2(gelu(fc1(.)))`` with exact (erf) GELU, or SwiGLU (``use_swiglu_ffn``: ``weights_out(silu(a) * b)``,
  ``[a; b] = weights_in(.)``, hidden ``(int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8``). LayerNorm eps
  ``layer_norm_eps`` (1e-6), then a final LayerNorm.
* Output: the last hidden state (B, 1 + R + N, D) after the final norm (float32); :func:`patch_tokens` drops
  CLS and registers.

Precision: params ``param_dtype`` (float32); the matmuls and the conv run in ``dtype`` (e.g. bfloat16);
LayerNorm, attention logits/softmax, GELU/SiLU, layer scale, the residual stream, the position embeddings and
the output are float32.

Layers are one ``nn.scan``: ``encoder/layer/...`` params carry a leading layer axis (logical "layers"). Flax paths
mirror the (Hub) checkpoint's module names; ``asymflow_jax.dinov2_import`` has the key mapping. Logical axes:
"embed" (hidden), "heads" (q/k/v width), "mlp" (feed-forward width), "layers"; conv spatial/channel axes and
singleton token axes are unnamed (replicated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.models.attention import attention

Dtype = Any

VARIANTS = ("dinov2", "dinov2_with_registers")
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}

# ----------------------------------------------------------------------------------------- config


def _square(value, name):
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{name} {value!r}: only square sizes are supported.")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Architecture hyperparameters; field names and defaults are transformers' ``Dinov2Config`` (plus
  ``num_register_tokens`` and ``model_type`` of ``Dinov2WithRegistersConfig``: "dinov2_with_registers" selects
  the registers model, whose mask token always exists and whose position interpolation is antialiased)."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  qkv_bias: bool = True
  layerscale_value: float = 1.0
  use_swiglu_ffn: bool = False
  use_mask_token: bool = True
  num_register_tokens: int = 0
  model_type: str = "dinov2"

  def __post_init__(self):
    object.__setattr__(self, "image_size", _square(self.image_size, "image_size"))
    object.__setattr__(self, "patch_size", _square(self.patch_size, "patch_size"))
    if self.model_type not in VARIANTS:
      raise ValueError(f"model_type {self.model_type!r}: expected one of {VARIANTS}.")
    if self.num_register_tokens and self.model_type != "dinov2_with_registers":
      raise ValueError("register tokens need model_type 'dinov2_with_registers' (see with_registers).")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                       f"{self.num_attention_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}.")
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    """Native patch grid side: image_size // patch_size (37 for 518 px, patch 14)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def mlp_hidden(self) -> int:
    """Feed-forward width: int(D * mlp_ratio); SwiGLU keeps 2/3 of it rounded up to a multiple of 8."""
    m = int(self.hidden_size * self.mlp_ratio)
    return (int(m * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else m

  @property
  def has_mask_token(self) -> bool:
    return self.use_mask_token or self.model_type == "dinov2_with_registers"

  @property
  def antialias_pos_embed(self) -> bool:
    """Whether the position-embedding interpolation is antialiased (the with-registers model)."""
    return self.model_type == "dinov2_with_registers"

  @property
  def num_prefix_tokens(self) -> int:
    """CLS + register tokens before the patch tokens."""
    return 1 + self.num_register_tokens

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Dinov2Config":
    """From a transformers config.json dict. Keys that do not change the architecture in inference
    (dropouts, drop_path_rate, initializer_range, backbone outputs, dtype, labels, ...) are ignored; a
    ``head_dim`` other than hidden_size / num_attention_heads is an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    if kw.get("model_type", "dinov2") not in VARIANTS:
      raise ValueError(f"model_type {kw['model_type']!r} is not a DINOv2 model ({VARIANTS}).")
    if kw.get("model_type") == "dinov2_with_registers":
      kw.setdefault("num_register_tokens", 4)   # Dinov2WithRegistersConfig's default
      kw.setdefault("patch_size", 16)
    cfg = cls(**kw)
    if d.get("head_dim") not in (None, cfg.head_dim):
      raise ValueError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads ({cfg.head_dim}).")
    return cfg


def _preset(base: dict, overrides: dict) -> Dinov2Config:
  return Dinov2Config(**{**dict(image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6,
                                layerscale_value=1.0, hidden_act="gelu", qkv_bias=True), **base, **overrides})


def dinov2_small(**overrides) -> Dinov2Config:
  """facebook/dinov2-small: ViT-S/14, 384 wide, 12 layers, 6 heads, 518 px native (37 x 37 grid)."""
  return _preset(dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6), overrides)


def dinov2_base(**overrides) -> Dinov2Config:
  """facebook/dinov2-base: ViT-B/14, 768 wide, 12 layers, 12 heads (the REPA encoder, spec section 5)."""
  return _preset(dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12), overrides)


def dinov2_large(**overrides) -> Dinov2Config:
  """facebook/dinov2-large: ViT-L/14, 1024 wide, 24 layers, 16 heads."""
  return _preset(dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16), overrides)


def dinov2_giant(**overrides) -> Dinov2Config:
  """facebook/dinov2-giant: ViT-g/14, 1536 wide, 40 layers, 24 heads, SwiGLU feed-forward (hidden 4096)."""
  return _preset(dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
                 overrides)


def with_registers(config: Dinov2Config, num_register_tokens: int = 4) -> Dinov2Config:
  """The with-registers variant of ``config`` (facebook/dinov2-with-registers-*: 4 registers)."""
  return dataclasses.replace(config, model_type="dinov2_with_registers", num_register_tokens=num_register_tokens)


def dinov2_tiny(registers: bool = False, **overrides) -> Dinov2Config:
  """The parity-fixture size (tests/fixtures/dinov2_tiny.json): 32 wide, 2 layers, 2 heads, patch 4, 16 px
  (4 x 4 grid). ``registers``: the with-registers model with 3 registers and the SwiGLU feed-forward."""
  base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
  if registers:
    base.update(use_swiglu_ffn=True, model_type="dinov2_with_registers", num_register_tokens=3)
  return _preset(base, overrides)


# ----------------------------------------------------------------------------- interpolation


def _keys_cubic(x, a):
  """The cubic convolution kernel with parameter ``a`` (torch: A = -0.75 plain, -0.5 antialiased)."""
  x = np.abs(np.asarray(x, np.float64))
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  scale = in_size / out_size          # torch's area_pixel_compute_scale with an explicit size
  m = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    for i in range(out_size):
      src = scale * (i + 0.5) - 0.5
      x0 = math.floor(src)
      t = src - x0
      weights = _keys_cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for j, w in enumerate(weights):
        m[i, min(max(x0 - 1 + j, 0), in_size - 1)] += w
    return m
  support = 2.0 * scale if scale >= 1 else 2.0
  invscale = 1.0 / scale if scale >= 1 else 1.0
  max_size = math.ceil(support) * 2 + 1
  for i in range(out_size):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), max_size)
    w = _keys_cubic((np.arange(xsize) + xmin - center + 0.5) * invscale, -0.5)
    total = w.sum()
    m[i, xmin:xmin + xsize] = w / total if total != 0 else w
  return m


def bicubic_resize_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) float64 matrix R with ``resized = R @ x`` along one axis, equal to torch's
  ``F.interpolate(mode="bicubic", align_corners=False, size=...)`` (separable, so a 2-D resize is
  ``R_h @ X @ R_w^T``). ``antialias=False``: Keys cubic A = -0.75 on the 4 taps around
  ``(i + 0.5) * in / out - 0.5``, indices clamped to the border. ``antialias=True``: torch's antialiased path
  (PIL-like): A = -0.5, the kernel support widened by in / out when downsampling, the window clipped to the
  input and the weights renormalised to sum 1."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}.")
  return _bicubic_matrix(int(in_size), int(out_size), bool(antialias)).copy()


def interpolate_pos_encoding(position_embeddings, height: int, width: int, antialias: bool = False):
  """transformers' ``interpolate_pos_encoding``: ``position_embeddings`` (1, 1 + g*g, D) of a g x g grid ->
  (1, 1 + height*width, D) float32, the patch rows bicubically resized in float32 (CLS row kept). The native
  grid is returned unchanged (the resize is the identity there anyway)."""
  n = position_embeddings.shape[1] - 1
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"position_embeddings cover {n} patches, not a square grid.")
  pos = jnp.asarray(position_embeddings, jnp.float32)
  if (height, width) == (g, g):
    return pos
  d = pos.shape[-1]
  r_h = jnp.asarray(bicubic_resize_matrix(g, height, antialias), jnp.float32)
  r_w = jnp.asarray(bicubic_resize_matrix(g, width, antialias), jnp.float32)
  grid = pos[0, 1:].reshape(g, g, d)
  grid = jnp.einsum("hy,yxd->hxd", r_h, grid, precision=jax.lax.Precision.HIGHEST)
  grid = jnp.einsum("wx,hxd->hwd", r_w, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:, :1], grid.reshape(1, height * width, d)], axis=1)


# --------------------------------------------------------------------------------------- modules

_trunc = nn.initializers.truncated_normal(0.02)


def _dense(features, names, *, use_bias=True, dtype, param_dtype, name):
  """nn.Dense with logical axis names (in, out) on the kernel and (out,) on the bias."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(_trunc, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]), name=name)


class LayerNorm(nn.Module):
  """torch LayerNorm (biased variance of the centred input), float32; params ``scale``/``bias`` ("embed")."""

  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                      self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class LayerScale(nn.Module):
  """x * lambda1 (float32), lambda1 (D,) initialised to ``value``."""

  value: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    lam = self.param("lambda1", nn.with_logical_partitioning(nn.initializers.constant(self.value), ("embed",)),
                     (x.shape[-1],), self.param_dtype)
    return x.astype(jnp.float32) * lam.astype(jnp.float32)


class Embeddings(nn.Module):
  """pixels NHWC -> [CLS; registers; patches] (B, 1 + R + N, D) float32 (see the module docstring)."""

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values, bool_masked_pos=None):
    cfg = self.config
    d, p = cfg.hidden_size, cfg.patch_size
    tok_init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", nn.with_logical_partitioning(tok_init, (None, None, "embed")), (1, 1, d),
                     self.param_dtype)
    mask = (self.param("mask_token", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")), (1, d),
                       self.param_dtype) if cfg.has_mask_token else None)
    pos = self.param("position_embeddings", nn.with_logical_partitioning(tok_init, (None, None, "embed")),
                     (1, cfg.num_patches + 1, d), self.param_dtype)
    regs = (self.param("register_tokens", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                       (1, cfg.num_register_tokens, d), self.param_dtype) if cfg.num_register_tokens else None)

    b, h, w, c = pixel_values.shape
    if c != cfg.num_channels:
      raise ValueError(f"pixel_values must be NHWC with {cfg.num_channels} channels, got {tuple(pixel_values.shape)}.")
    if h < p or w < p:
      raise ValueError(f"pixel_values {h}x{w} is smaller than one {p}x{p} patch.")
    patches = _PatchEmbeddings(cfg, self.dtype, self.param_dtype, name="patch_embeddings")(pixel_values)
    gh, gw = h // p, w // p
    x = patches.astype(jnp.float32).reshape(b, gh * gw, d)
    if bool_masked_pos is not None:
      if mask is None:
        raise ValueError("bool_masked_pos needs a mask token (use_mask_token=True).")
      x = jnp.where(jnp.asarray(bool_masked_pos, bool)[..., None], mask.astype(jnp.float32)[None], x)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (b, 1, d)), x], axis=1)
    x = x + interpolate_pos_encoding(pos, gh, gw, cfg.antialias_pos_embed)
    if regs is not None:
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(regs.astype(jnp.float32), (b,) + regs.shape[1:]), x[:, 1:]],
                          axis=1)
    return x


class _PatchEmbeddings(nn.Module):
  """The patch conv as ``patch_embeddings/projection`` (the checkpoint's module path): kernel (p, p, C, D)."""

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, p = self.config.hidden_size, self.config.patch_size
    return nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.with_logical_partitioning(_trunc, (None, None, None, "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                   name="projection")(x.astype(self.dtype))


class _Output(nn.Module):
  features: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    return _dense(self.features, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="dense")(x)


class _AttentionBlock(nn.Module):
  """``attention/attention`` (q/k/v) and ``attention/output/dense``, as the checkpoint nests them."""

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shape = x.shape[:2] + (cfg.num_attention_heads, cfg.head_dim)
    qkv = _QKV(cfg, self.dtype, self.param_dtype, name="attention")(x.astype(self.dtype))
    out = attention(*(t.reshape(shape) for t in qkv), dtype=self.dtype, impl=self.attention_impl)
    return _Output(cfg.hidden_size, **kw, name="output")(out)


class _QKV(nn.Module):
  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return [_dense(cfg.hidden_size, ("embed", "heads"), use_bias=cfg.qkv_bias, name=n, **kw)(x)
            for n in ("query", "key", "value")]


class MLP(nn.Module):
  """fc1 -> activation (float32) -> fc2, or SwiGLU weights_in -> silu(a) * b -> weights_out."""

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    m, x = cfg.mlp_hidden, x.astype(self.dtype)
    if cfg.use_swiglu_ffn:
      h = _dense(2 * m, ("embed", "mlp"), name="weights_in", **kw)(x).astype(jnp.float32)
      h = jax.nn.silu(h[..., :m]) * h[..., m:]
      return _dense(cfg.hidden_size, ("mlp", "embed"), name="weights_out", **kw)(h.astype(self.dtype))
    h = ACTIVATIONS[cfg.hidden_act](_dense(m, ("embed", "mlp"), name="fc1", **kw)(x).astype(jnp.float32))
    return _dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h.astype(self.dtype))


class Layer(nn.Module):
  """Scan body: x (B, T, D) float32 -> x + ls1 attn(norm1 x) -> + ls2 mlp(norm2 .); output sown as
  ``hidden_states``."""

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x, _):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="norm1")(x)
    y = _AttentionBlock(cfg, attention_impl=self.attention_impl, name="attention", **kw)(y)
    x = x + LayerScale(cfg.layerscale_value, self.param_dtype, name="layer_scale1")(y)
    y = MLP(cfg, name="mlp", **kw)(LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="norm2")(x))
    x = x + LayerScale(cfg.layerscale_value, self.param_dtype, name="layer_scale2")(y)
    self.sow("intermediates", "hidden_states", x, reduce_fn=lambda _, new: new)
    return x, None


class Encoder(nn.Module):
  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    scanned = nn.scan(Layer, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,), length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, self.dtype, self.param_dtype, self.attention_impl, name="layer")(x, None)
    return x


class Dinov2Model(nn.Module):
  """DINOv2: (pixel_values NHWC (B, H, W, C), bool_masked_pos (B, N) | None) -> last hidden state
  (B, 1 + R + N, D) float32 after the final LayerNorm, N = (H // p) (W // p).

  Attributes:
    config: a :class:`Dinov2Config`.
    dtype: compute dtype of the conv and the matmuls (float32 or bfloat16); params stay ``param_dtype``.
    attention_impl: "einsum" (float32 softmax) or "dot_product_attention" (``jax.nn.dot_product_attention``).
  """

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, pixel_values, bool_masked_pos=None):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Embeddings(cfg, name="embeddings", **kw)(pixel_values, bool_masked_pos)
    self.sow("intermediates", "embedding_output", x, reduce_fn=lambda _, new: new)
    if cfg.num_hidden_layers:
      x = Encoder(cfg, attention_impl=self.attention_impl, name="encoder", **kw)(x)
    return LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layernorm")(x)


# --------------------------------------------------------------------------------------- helpers


def patch_tokens(last_hidden_state, config: Dinov2Config):
  """The patch tokens (B, N, D) of a (B, 1 + R + N, D) output (CLS and registers dropped; the REPA target)."""
  return last_hidden_state[:, config.num_prefix_tokens:]


def dummy_inputs(config: Dinov2Config, batch: int = 1):
  """Zero pixels at the native size (positional args for init / eval_shape)."""
  return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)


def abstract_params(model: Dinov2Model):
  """Boxed (nn.Partitioned) parameter ShapeDtypeStructs via jax.eval_shape (no allocation)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.config)))["params"]


def param_specs(model: Dinov2Model):
  """Logical PartitionSpecs (tree like params): feed to ``asymflow_jax.sharding.logical_to_sharding``."""
  return nn.get_partition_spec(abstract_params(model))


def param_count(model_or_config) -> int:
  """Number of parameters, from shapes only."""
  model = model_or_config if isinstance(model_or_config, Dinov2Model) else Dinov2Model(model_or_config)
  tree = nn.meta.unbox(abstract_params(model))
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def apply_with_intermediates(model: Dinov2Model, params, pixel_values, bool_masked_pos=None):
  """(last_hidden_state, hidden_states): hidden_states (num_hidden_layers + 1, B, T, D) float32 = the
  embedding output then every layer's output (before the final norm), like transformers'
  ``output_hidden_states``."""
  out, state = model.apply({"params": params}, pixel_values, bool_masked_pos, mutable=["intermediates"])
  inter = state["intermediates"]
  hidden = [inter["embedding_output"][None]]
  if model.config.num_hidden_layers:
    hidden.append(inter["encoder"]["layer"]["hidden_states"])
  return out, jnp.concatenate(hidden, axis=0)
