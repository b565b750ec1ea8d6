"""Scaled dot-product attention with a switchable kernel, shared by the backbones and encoders.

``IMPLS``: "einsum" (explicit float32 logits and softmax: the exact-parity path, and the one that
allows dropout on the attention probabilities) or "dot_product_attention"
(``jax.nn.dot_product_attention``: JAX picks the kernel, cuDNN flash attention on GPUs for bf16/fp16
operands, XLA's fused softmax elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("einsum", "dot_product_attention")


def attention(q, k, v, *, dtype, impl: str = "einsum"):
  """softmax(q k^T / sqrt(hd)) v: q, k, v (B, S, heads, hd) -> (B, S, heads * hd) in ``dtype``.

  "einsum": ``dtype`` operands, float32 logits/softmax/accumulation. "dot_product_attention":
  ``jax.nn.dot_product_attention`` (XLA or cuDNN flash attention, chosen by JAX).
  """
  b, s, h, d = q.shape
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  if impl == "einsum":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v, preferred_element_type=jnp.float32)
  elif impl == "dot_product_attention":
    out = jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5)
  else:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}.")
  return out.astype(dtype).reshape(b, s, h * d)
