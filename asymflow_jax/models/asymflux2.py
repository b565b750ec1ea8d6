"""AsymFLUX.2: a FLUX.2 transformer lifted into pixel space with the AsymFlow head (spec sections 2, 8, 11).

The backbone is :class:`~asymflow_jax.models.flux2.Flux2Transformer` whose token width is the pixel
patch dimension D = p*p*C (x_embedder (D, hidden), proj_out (hidden, D)); :func:`lift_flux2_params`
makes those two kernels from a latent FLUX.2 through a Procrustes basis U (D, d):

  x_embedder <- U W_in   (input D),    proj_out <- W_out U^T   (output D)

(the torch-layout W_in U^T and U W_out of the spec; no biases in FLUX.2). Forward, for NHWC pixels:

  k, t = calibrate(sigma, s);  u_A = FLUX(k * patchify(x_t), prompt_embeds, timestep=t)   (x1000 inside)
  u = recover_velocity(u_A, patchify(x_t), U, sigma, scale=s, sigma_min)                 (float32)

Token packing: this project packs pixel tokens (py, px, c) (DiT order) everywhere, so U's rows are
in DiT order (``Subspace.with_packing("dit")``); its columns stay in FLUX.2's latent token order
(channel-first latent patches, the order the pretrained x_embedder reads). The reference packs
pixels channel-first; the two models are the same function of the image, their x_embedder rows are
a permutation of each other. Image-condition pixels (editing) are appended as extra tokens divided
by s (not multiplied by k) with position ids T = 10 (i + 1); only the generated tokens are returned.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from asymflow_jax import asymflow as af
from asymflow_jax import lift
from asymflow_jax.models import flux2

IN_KERNEL = ("x_embedder", "kernel")
OUT_KERNEL = ("proj_out", "kernel")


def pixel_flux2_config(latent: flux2.Flux2Config, patch_size: int, channels: int) -> flux2.Flux2Config:
  """The pixel backbone of a lifted latent FLUX.2: token width p*p*C in and out, all else unchanged."""
  if latent.patch_size != 1:
    raise ValueError(f"the latent FLUX.2 must read packed tokens (patch_size=1), got patch_size={latent.patch_size}.")
  return dataclasses.replace(latent, in_channels=patch_size * patch_size * channels, out_channels=None)


def patch_size_of(model: flux2.Flux2Transformer, channels: int) -> int:
  """The pixel patch p of a pixel FLUX.2 backbone (token width p*p*C) for C = ``channels``."""
  d = model.config.in_channels
  p = math.isqrt(d // channels) if d % channels == 0 else 0
  if p * p * channels != d:
    raise ValueError(f"backbone token width {d} is not p*p*{channels} for an integer patch size p.")
  return p


def lift_flux2_params(latent_params, basis):
  """:func:`asymflow_jax.lift.lift_params` on FLUX.2's x_embedder / proj_out (bias-free)."""
  return lift.lift_params(latent_params, basis, in_kernel=IN_KERNEL, out_kernel=OUT_KERNEL)


def asymflux2_apply(model: flux2.Flux2Transformer, params, x_t, sigma, prompt_embeds, basis, *, scale=1.0,
                    sigma_min: float, condition_images=None, guidance=None, rngs=None, lora=None,
                    return_u_a: bool = False):
  """AsymFLUX.2 velocity.

  Args:
    model: a pixel :class:`Flux2Transformer` (``in_channels`` = p*p*C, ``patch_size`` 1).
    params: its parameters (``variables["params"]``).
    x_t: noisy images x_sigma, NHWC (B, H, W, C), H and W multiples of p.
    sigma: (B,) noise levels in [0, 1].
    prompt_embeds: text features (B, L, joint_attention_dim); text ids (0, 0, 0, l).
    basis: U (D, r), rows in DiT (py, px, c) order.
    scale: s of the Procrustes subspace.
    sigma_min: recovery clamp (1e-6 in training, 1e-4 the reference's T2I default).
    condition_images: optional (B, H', W', C) reference images (editing), fed as tokens / s.
    guidance: optional (B,) guidance-embedding input (distilled models only).
    rngs: e.g. {"lora_dropout": key}. lora: adapters as the "lora" collection (finetuning).
    return_u_a: also return the raw network output u_A (B, N, D).

  Returns:
    velocity (B, H, W, C) float32; or (velocity, u_a).
  """
  b, h, w, c = x_t.shape
  p = patch_size_of(model, c)
  af.check_basis(basis, model.config.in_channels)
  x_t = x_t.astype(jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  k, t = af.calibrate(sigma, scale)
  tokens = af.patchify(x_t, p)
  hidden = (k[:, None, None] * tokens).astype(model.dtype)
  ids = flux2.image_ids(h // p, w // p)
  if condition_images is not None:
    cond = af.patchify(condition_images.astype(jnp.float32), p) / jnp.asarray(scale, jnp.float32)
    hidden = jnp.concatenate([hidden, cond.astype(model.dtype)], axis=1)
    hc, wc = condition_images.shape[1] // p, condition_images.shape[2] // p
    ids = np.concatenate([ids, flux2.image_ids(hc, wc, t=10)], axis=0)
  variables = {"params": params, **({"lora": lora} if lora else {})}
  out = model.apply(variables, hidden, prompt_embeds.astype(model.dtype), t, ids,
                    flux2.text_ids(prompt_embeds.shape[1]), guidance, rngs=rngs)
  u_a = out[:, :tokens.shape[1]]
  u = af.recover_velocity(u_a.astype(jnp.float32), tokens, jnp.asarray(basis, jnp.float32), sigma, scale=scale,
                          sigma_min=sigma_min)
  velocity = af.unpatchify(u, p, h, w)
  return (velocity, u_a) if return_u_a else velocity


def init_params(model: flux2.Flux2Transformer, key, *, num_text: int = 2):
  """Randomly initialised (unboxed) parameters of a pixel backbone, e.g. for tests and tiny runs."""
  args, kwargs = flux2.dummy_inputs(model.config, n_txt=num_text)
  return nn.meta.unbox(model.init(key, *args, **kwargs)["params"])


def zero_basis(model: flux2.Flux2Transformer) -> jax.Array:
  return jnp.zeros((model.config.in_channels, 0), jnp.float32)
