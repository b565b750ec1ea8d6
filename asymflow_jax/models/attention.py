"""Scaled dot-product attention with a switchable kernel, shared by the backbones and encoders.

``IMPLS``: "einsum" (explicit float32 logits and softmax: the exact-parity path, and the one that
allows dropout on the attention probabilities), "dot_product_attention"
(``jax.nn.dot_product_attention``: JAX picks the kernel, cuDNN flash attention on GPUs for bf16/fp16
operands, XLA's fused softmax elsewhere), or "splash" (the TPU splash-attention Pallas kernel: a
flash kernel that never materialises the S x S logits; run by the Pallas interpreter on CPU, for
tests only).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from asymflow_jax import sharding as shd

IMPLS = ("einsum", "dot_product_attention", "splash")
SPLASH_ALIGN = 128   # the kernel's sequence tiling: S is padded to a multiple of this


def attention(q, k, v, *, dtype, impl: str = "einsum", sharding=None):
  """softmax(q k^T / sqrt(hd)) v: q, k, v (B, S, heads, hd) -> (B, S, heads * hd) in ``dtype``.

  "einsum": ``dtype`` operands, float32 logits/softmax/accumulation. "dot_product_attention":
  ``jax.nn.dot_product_attention`` (XLA or cuDNN flash attention, chosen by JAX). "splash":
  :func:`splash_attention` (``sharding``: the activations' batch sharding, see there).
  """
  b, s, h, d = q.shape
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  if impl == "einsum":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v, preferred_element_type=jnp.float32)
  elif impl == "dot_product_attention":
    out = jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5)
  elif impl == "splash":
    out = splash_attention(q, k, v, sharding=sharding)
  else:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}.")
  return out.astype(dtype).reshape(b, s, h * d)


def _platform(sharding) -> str:
  devices = sharding.mesh.devices.flat if sharding is not None else jax.devices()
  return next(iter(devices)).platform


def _block(n: int) -> int:
  """The largest of 512, 256, 128 that divides ``n`` (a multiple of 128)."""
  return next(b for b in (512, 256, SPLASH_ALIGN) if n % b == 0)


def splash_attention(q, k, v, *, sharding=None, interpret: bool | None = None):
  """Softmax attention with the TPU splash kernel: q, k, v (B, S, heads, hd) -> (B, S, heads, hd) in q's dtype.

  The kernel tiles the sequence in blocks of 128-512, so S is padded to a multiple of 128; padded
  keys get their own segment id and are never attended (their queries' outputs are dropped).
  Pallas kernels are not partitioned by XLA: with ``sharding`` (a NamedSharding whose first spec
  entry splits the batch, the model's ``batch_sharding``) the kernel runs per shard under
  ``shard_map``, batch over those mesh axes when they divide it (else every shard runs the whole
  batch) and heads over ``tensor`` when it divides them; without it, on one device. ``interpret`` (default: unless the devices are TPUs) runs the Pallas
  interpreter, which is exact but slow: for tests on CPU. No dropout on the probabilities.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib   # pylint: disable=import-outside-toplevel
  platform = _platform(sharding)
  if platform not in ("tpu", "cpu"):
    raise ValueError(f"attention_impl='splash' is a TPU kernel (the devices here are {platform!r}); on GPUs use "
                     "'dot_product_attention' (cuDNN flash attention).")
  interpret = platform != "tpu" if interpret is None else interpret
  b, s, h, d = q.shape
  padded = -(-s // SPLASH_ALIGN) * SPLASH_ALIGN
  block = _block(padded)

  def local(q, k, v):   # (b, heads, S', hd) on one shard
    heads = q.shape[1]
    kernel = splash_lib.make_splash_mha(
        splash_lib.MultiHeadMask([splash_lib.FullMask((padded, padded))] * heads), head_shards=1, q_seq_shards=1,
        block_sizes=splash_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                          block_kv_dq=block),
        interpret=interpret)
    if padded == s:
      return jax.vmap(kernel)(q, k, v)
    segment = jnp.asarray((np.arange(padded) >= s).astype(np.int32))
    return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, splash_lib.SegmentIds(q=segment, kv=segment))

  to_kernel = lambda t: jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, 0), (0, padded - s), (0, 0)))
  q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)   # the kernel applies no scale
  q, k, v = to_kernel(q), to_kernel(k), to_kernel(v)
  if sharding is not None and sharding.mesh.size > 1:
    # axes that do not divide their dimension are dropped (e.g. the batch of 1 that initialises the model)
    spec = shd.fit_spec(P(sharding.spec[0], "tensor", None, None), q.shape, sharding.mesh)
    local = jax.shard_map(local, mesh=sharding.mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  out = local(q, k, v)
  return jnp.swapaxes(out[:, :, :s], 1, 2)
