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

import jax
import jax.numpy as jnp
import flax.linen as nn

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
