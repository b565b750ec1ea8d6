"""REPA (representation alignment): projector, encoder inputs and the alignment loss (spec section 5).

A frozen DINOv2 sees the clean images; the flow network's hidden state after a configured block
(image tokens only, (B, N, hidden)) goes through a trained 3-layer SiLU projector, and the loss is

    L_repa = -weight * mean over batch and tokens of cos(projector(h), dino_tokens)

with both sides L2-normalised in float32 (``x / max(|x|, 1e-12)``, as ``torch.nn.functional.normalize``).
The target is DINOv2's last hidden state without the CLS and register tokens. Encoder inputs: model-range
images in [-1, 1] -> [0, 1] -> antialiased bicubic resize to the encoder size (torch's
``F.interpolate(bicubic, antialias=True)``: A = -0.5, the support widened when downsampling), clamped to
[0, 1] after a resize, grey repeated to RGB, ImageNet mean/std normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.evaluation import lpips
from asymflow_jax.models import dinov2
from asymflow_jax.models.dinov2 import bicubic_resize_matrix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_EPS = 1e-12


class Projector(nn.Module):
  """Linear(hidden -> width) -> SiLU -> Linear(width -> width) -> SiLU -> Linear(width -> out);
  xavier-uniform kernels, zero biases. (..., hidden) -> (..., out) float32."""
  width: int
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),  # noqa: E731
                                     bias_init=nn.initializers.zeros, name=name)
    h = nn.silu(dense(self.width, "linear_0")(h))
    h = nn.silu(dense(self.width, "linear_1")(h))
    return dense(self.out_dim, "linear_2")(h).astype(jnp.float32)


def projector_specs():
  """Logical PartitionSpecs of the projector's parameters (FSDP over its "embed" axes, like the backbone)."""
  P = jax.sharding.PartitionSpec
  axes = dict(linear_0=(("embed", "mlp"), ("mlp",)), linear_1=(("mlp", "embed"), ("embed",)),
              linear_2=(("embed", None), (None,)))
  return {name: dict(kernel=P(*k), bias=P(*b)) for name, (k, b) in axes.items()}


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORMALIZE_EPS)


def alignment_loss(projected, target, weight: float):
  """``-weight * mean(cos(projected, target))`` over all leading axes; projected (B, N, D) and target
  (B, N, D) (any float dtype; normalised in float32). Shapes must agree (checked at trace time)."""
  if projected.shape != target.shape:
    raise ValueError(f"REPA: projected features {tuple(projected.shape)} and encoder tokens "
                     f"{tuple(target.shape)} must have the same (batch, tokens, width).")
  return -weight * jnp.mean(jnp.sum(_normalize(projected) * _normalize(target), axis=-1))


def repa_loss(projector: Projector, projector_params, features, target, weight: float):
  """The REPA term of the training loss: features (B, N, hidden) of the flow network's configured
  block, target (B, N, D_enc) the frozen encoder's patch tokens (no gradient flows into them)."""
  projected = projector.apply({"params": projector_params}, features)
  return alignment_loss(projected, jax.lax.stop_gradient(target), weight)


def encoder_inputs(images, size: int):
  """Model-range images (B, H, W, C) in [-1, 1], C = 1 or 3 -> DINOv2 inputs (B, size, size, 3) float32."""
  b, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f"REPA encoder inputs need 1 or 3 channels, got images of shape {tuple(images.shape)}.")
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if (h, w) != (size, size):
    r_h = jnp.asarray(bicubic_resize_matrix(h, size, antialias=True), jnp.float32)
    r_w = jnp.asarray(bicubic_resize_matrix(w, size, antialias=True), jnp.float32)
    x = jnp.einsum("yh,bhwc,xw->byxc", r_h, x, r_w, precision=jax.lax.Precision.HIGHEST)
    x = jnp.clip(x, 0.0, 1.0)
  if c == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


# ------------------------------------------------------------------------------------ the encoder

ENCODERS = ("dinov2_small", "dinov2_base", "dinov2_large", "dinov2_giant", "dinov2_tiny", "vgg16")


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen REPA encoder on a ``grid`` x ``grid`` token grid (the flow network's).

  ``dinov2_*``: DINOv2 of that size (patch 14; ``dinov2_tiny`` the 4-px-patch test size), input
  ``grid * patch`` px, target = last hidden state without CLS/registers, width ``hidden_size``.
  ``vgg16``: torchvision's ImageNet VGG16 trunk (the LPIPS weights), tap ``vgg_tap`` (0..4 =
  relu1_2..relu5_3), input ``grid * 2**vgg_tap`` px, target = that tap's pixels as tokens.
  Parameters are never trained; ``dtype`` is the compute dtype (the spec runs DINOv2 in bfloat16).
  """
  kind: str
  grid: int
  dtype: Any = jnp.bfloat16
  vgg_tap: int = 2

  def __post_init__(self):
    if self.kind not in ENCODERS:
      raise ValueError(f"REPA encoder {self.kind!r}: expected one of {ENCODERS}.")
    if self.kind == "vgg16" and not 0 <= self.vgg_tap < lpips.NUM_LAYERS:
      raise ValueError(f"REPA vgg_tap={self.vgg_tap}: expected 0..{lpips.NUM_LAYERS - 1} (relu1_2..relu5_3).")

  @property
  def dinov2_config(self) -> dinov2.Dinov2Config:
    return getattr(dinov2, self.kind)()

  @property
  def module(self) -> nn.Module:
    if self.kind == "vgg16":
      return lpips.VGG16Features(dtype=self.dtype, precision=None, num_blocks=self.vgg_tap + 1)
    return dinov2.Dinov2Model(self.dinov2_config, dtype=self.dtype, param_dtype=self.dtype)

  @property
  def input_size(self) -> int:
    """Side of the encoder's input images (its token grid equals the flow network's)."""
    if self.kind == "vgg16":
      return self.grid * 2 ** self.vgg_tap
    return self.grid * self.dinov2_config.patch_size

  @property
  def dim(self) -> int:
    """Width of the target tokens (the projector's output)."""
    return lpips.TAP_CHANNELS[self.vgg_tap] if self.kind == "vgg16" else self.dinov2_config.hidden_size

  def _boxed_abstract_params(self):
    x = jnp.zeros((1, self.input_size, self.input_size, 3), jnp.float32)
    return jax.eval_shape(lambda: self.module.init(jax.random.key(0), x))["params"]

  def abstract_params(self):
    """Unboxed parameter ShapeDtypeStructs (in ``dtype``)."""
    return nn.meta.unbox(self._boxed_abstract_params())

  def param_specs(self):
    """Logical PartitionSpecs (DINOv2 carries the model's logical axes; VGG is replicated)."""
    return nn.get_partition_spec(self._boxed_abstract_params())

  def tokens(self, params, images):
    """Model-range images (B, H, W, C) in [-1, 1] -> target tokens (B, grid * grid, dim) float32."""
    x = encoder_inputs(images, self.input_size)
    if self.kind == "vgg16":
      f = self.module.apply({"params": params}, x.astype(self.dtype))[-1]
      return f.reshape(f.shape[0], -1, f.shape[-1]).astype(jnp.float32)
    out = self.module.apply({"params": params}, x.astype(self.dtype))
    return dinov2.patch_tokens(out, self.dinov2_config).astype(jnp.float32)


def vgg16_params(lpips_params, vgg_tap: int, dtype=jnp.bfloat16):
  """The VGG16 trunk's convs up to tap ``vgg_tap`` from LPIPS variables (``lpips.load_lpips_params``)."""
  vgg = lpips_params["params"]["vgg"]
  keep = {f"conv{b + 1}_" for b in range(vgg_tap + 1)}
  return {k: jax.tree.map(lambda a: jnp.asarray(a, dtype), v) for k, v in vgg.items() if k[:6] in keep}
