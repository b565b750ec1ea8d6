"""Activations with hand-written gradients, shared by the backbones.

``swiglu(h)``: the SwiGLU gate ``silu(a) * b`` of a fused projection ``h = [a, b]``. Its custom VJP
keeps only ``h`` for the backward and computes both halves of the gradient in one elementwise pass,
written straight into the layout of ``h``. Autodiff of the plain formula instead keeps sigmoid and
SiLU intermediates and builds the gradient of the split as two padded halves added together (on
the reference config: 19 MiB more of XLA's per-step temporaries and ~9 ms more elementwise work in
the forward; the step-time difference is within CPU timing noise, bench/README.md). Forward-mode
differentiation (``jax.jvp``) is not defined for it; nothing in the project uses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def swiglu(h):
  """(..., 2M) -> (..., M): silu(h[..., :M]) * h[..., M:], computed in float32, returned in h.dtype."""
  a, b = _halves(h)
  return (jax.nn.silu(a) * b).astype(h.dtype)


def _halves(h):
  if h.shape[-1] % 2:
    raise ValueError(f"swiglu: the last axis must hold two halves [gate, up], got shape {tuple(h.shape)}.")
  m = h.shape[-1] // 2
  return h[..., :m].astype(jnp.float32), h[..., m:].astype(jnp.float32)


def _swiglu_fwd(h):
  return swiglu(h), h


def _swiglu_bwd(h, g):
  # d/da silu(a) = s (1 + a (1 - s)) with s = sigmoid(a); d/db = silu(a)
  a, b = _halves(h)
  g = g.astype(jnp.float32)
  s = jax.nn.sigmoid(a)
  da = g * b * s * (1 + a * (1 - s))
  db = g * a * s
  return (jnp.concatenate([da, db], axis=-1).astype(h.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
