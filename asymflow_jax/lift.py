"""Latent-to-pixel lift (spec sections 7-8): a latent flow model becomes a pixel AsymFlow model.

A Procrustes subspace maps a latent token z (d = p_l^2 C_l) to the pixel token s U z (D = P^2 C,
P = p_l x the autoencoder's downsampling). Lifting rewrites only the two projections that touch
tokens (row-vector convention, Flax kernels are (in, out)):

    input  (token -> hidden):  W_in  (d, h)  ->  U W_in   (D, h)     (torch: W_in U^T)
    output (hidden -> token):  W_out (h, d)  ->  W_out U^T (h, D),  b_out (d,) -> U b_out

and the pixel model runs the AsymFlow forward with basis U and scale s: it is fed k x_sigma with
k = 1 / (s + (1 - s) sigma) and time sigma k, and its output is read as u_A = Pi eps - x0 / s. If
the latent model predicts the latent velocity eps_z - z, then at initialisation, for any pixel
state, the lifted model's u_A is U times the latent model's velocity at the calibrated state
k U^T x_sigma, so x0_hat lies in the subspace (complement 0) and equals s U z0_hat of the latent
model. Everything here is a pure function of parameter trees and arrays.

Packing: the project's JiT packs tokens (py, px, c) ("dit"); Procrustes files are channel-first in
both rows (pixels) and columns (latents). :func:`basis_for_dit` re-orders both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.models import jit_model

_HIGHEST = jax.lax.Precision.HIGHEST

# Where the JiT backbone's token projections live.
JIT_IN_KERNEL = ("x_embedder", "proj1", "kernel")
JIT_OUT_KERNEL = ("final_layer", "linear", "kernel")
JIT_OUT_BIAS = ("final_layer", "linear", "bias")


def _get(tree, path: Sequence[str]):
  node = tree
  for i, name in enumerate(path):
    if not isinstance(node, dict) or name not in node:
      raise KeyError(f"parameter path {'/'.join(path)!r} not found (no {name!r} under "
                     f"{'/'.join(path[:i]) or 'the root'}; have {sorted(node) if isinstance(node, dict) else node}).")
    node = node[name]
  return node


def _replace(tree, path: Sequence[str], value):
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def lift_params(params, basis, *, in_kernel: Sequence[str], out_kernel: Sequence[str],
                out_bias: Sequence[str] | None = None) -> Any:
  """Lifts a latent model's parameter tree through U (D, d).

  Args:
    params: the latent model's parameters (nested dicts of arrays).
    basis: U, (D, d) orthonormal columns; rows in the pixel model's token packing, columns in the
      latent model's token packing.
    in_kernel: path of the input projection kernel (d, h) (latent token -> hidden).
    out_kernel: path of the output projection kernel (h, d) (hidden -> latent token).
    out_bias: path of the output bias (d,), or None if the layer has none. Input biases act after
      the projection and stay unchanged.

  Returns:
    a new tree with kernels (D, h) and (h, D) (and bias (D,)), in the original dtypes.
  """
  u = jnp.asarray(basis, jnp.float32)
  af.check_basis(u)
  d_pix, d_lat = u.shape
  w_in, w_out = _get(params, in_kernel), _get(params, out_kernel)
  if w_in.ndim != 2 or w_in.shape[0] != d_lat:
    raise ValueError(f"input kernel {'/'.join(in_kernel)} has shape {tuple(w_in.shape)}; expected ({d_lat}, hidden) "
                     f"for a basis of shape {tuple(u.shape)} (latent token dimension d={d_lat}).")
  if w_out.ndim != 2 or w_out.shape[1] != d_lat:
    raise ValueError(f"output kernel {'/'.join(out_kernel)} has shape {tuple(w_out.shape)}; expected (hidden, {d_lat}).")
  new_in = jnp.matmul(u, w_in.astype(jnp.float32), precision=_HIGHEST).astype(w_in.dtype)
  new_out = jnp.matmul(w_out.astype(jnp.float32), u.T, precision=_HIGHEST).astype(w_out.dtype)
  out = _replace(_replace(params, in_kernel, new_in), out_kernel, new_out)
  if out_bias is not None:
    b = _get(params, out_bias)
    if b.shape != (d_lat,):
      raise ValueError(f"output bias {'/'.join(out_bias)} has shape {tuple(b.shape)}; expected ({d_lat},).")
    out = _replace(out, out_bias, jnp.matmul(u, b.astype(jnp.float32), precision=_HIGHEST).astype(b.dtype))
  return out


def lift_jit_params(params, basis) -> Any:
  """:func:`lift_params` for the project's JiT backbone (x_embedder.proj1 in, final_layer.linear out)."""
  return lift_params(params, basis, in_kernel=JIT_IN_KERNEL, out_kernel=JIT_OUT_KERNEL, out_bias=JIT_OUT_BIAS)


def pixel_jit_config(latent: jit_model.JiTConfig, factor: int, pixel_channels: int) -> jit_model.JiTConfig:
  """The pixel backbone of a lifted latent JiT: input and patch x ``factor`` (the autoencoder's
  downsampling), ``pixel_channels`` channels; the token grid, widths and depth are unchanged."""
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}.")
  return dataclasses.replace(latent, input_size=latent.input_size * factor, patch_size=latent.patch_size * factor,
                             in_channels=pixel_channels)


def basis_for_dit(sub: subspace_lib.Subspace, latent_patch_size: int) -> np.ndarray:
  """A Procrustes subspace's U with rows (pixels) and columns (latents) both in DiT (py, px, c) order.

  ``sub`` rows are in ``sub.packing``; its columns are channel-first latent tokens of patch
  ``latent_patch_size`` (as :func:`asymflow_jax.subspace.procrustes_subspace` writes them).
  """
  d_lat = sub.rank
  if d_lat % (latent_patch_size ** 2):
    raise ValueError(f"subspace rank {d_lat} is not latent_patch_size^2 * C (latent_patch_size={latent_patch_size}).")
  rows = sub.with_packing("dit").basis
  cols = subspace_lib.packing_permutation(latent_patch_size, d_lat // latent_patch_size ** 2, "channel_first", "dit")
  return rows[:, cols]


def low_rank_image(latents, basis, scale, *, latent_patch_size: int, patch_size: int):
  """x0^lr = s U z as an NHWC pixel image: latents (B, h, w, C_l) -> (B, h*P/p_l, w*P/p_l, C).

  ``basis`` (D, d) has rows in DiT pixel packing and columns in DiT latent packing (see
  :func:`basis_for_dit`); the pixel grid equals the latent token grid.
  """
  b, h, w, _ = latents.shape
  z = af.patchify(latents, latent_patch_size)                       # (B, N, d)
  x = jnp.matmul(z.astype(jnp.float32), jnp.asarray(basis, jnp.float32).T, precision=_HIGHEST)
  grid_h, grid_w = h // latent_patch_size, w // latent_patch_size
  return jnp.asarray(scale, jnp.float32) * af.unpatchify(x, patch_size, grid_h * patch_size, grid_w * patch_size)


def latent_tokens(images, basis, scale, *, patch_size: int) -> jax.Array:
  """The linear decode's inverse: z = U^T x / s per token, (B, N, d) (for tests and diagnostics)."""
  x = af.patchify(jnp.asarray(images, jnp.float32), patch_size)
  return jnp.matmul(x, jnp.asarray(basis, jnp.float32), precision=_HIGHEST) / jnp.asarray(scale, jnp.float32)
