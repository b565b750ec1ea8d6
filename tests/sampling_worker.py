"""Generates 16 images with a tiny random AsymJiT on however many devices this process has.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sampling_worker.py OUT.npz
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asymflow_jax import sampling, sharding  # noqa: E402
from asymflow_jax.models import asymjit, jit_model as jit_lib  # noqa: E402


def perturbed_tiny_model():
  """A tiny AsymJiT whose parameters are all non-zero (the reference init zeroes the output layers)."""
  cfg = jit_lib.jit_config("tiny", in_channels=1, hidden_size=32, depth=2, num_heads=2, in_context_len=2)
  model = jit_lib.JiT(cfg)
  basis = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((16, 4)))[0], jnp.float32)
  params = asymjit.init_params(model, jax.random.key(0), basis)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params, basis


def main():
  model, params, basis = perturbed_tiny_model()
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  images = sampling.generate_on_mesh(model, params, basis, 1.0, mesh, 0, 16, seed=7, guidance=2.0,
                                     interval=(0.0, 0.88), num_steps=4, method="heun")
  np.savez(sys.argv[1], images=images, devices=jax.device_count())


if __name__ == "__main__":
  main()
