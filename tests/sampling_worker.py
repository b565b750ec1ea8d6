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


def perturbed_tiny_model(**config):
  """A tiny AsymJiT (one channel, 32 px, patch 4, rank 4; ``config`` overrides its jit_config fields)
  whose parameters are all non-zero (the reference init zeroes the output layers)."""
  cfg = jit_lib.jit_config("tiny", **dict(dict(in_channels=1, hidden_size=32, depth=2, num_heads=2, in_context_len=2),
                                          **config))
  model = jit_lib.JiT(cfg)
  basis = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((16 * cfg.in_channels, 4)))[0],
                      jnp.float32)
  # one compiled init (run eagerly it compiles hundreds of small programs), perturbed on the host
  params = jax.jit(lambda b: asymjit.init_params(model, jax.random.key(0), b))(basis)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32)),
                        params)
  return model, params, basis


def generate_images():
  """The 16 images, sampled over every device of this process (also called in the test process)."""
  model, params, basis = perturbed_tiny_model()
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  return sampling.generate_on_mesh(model, params, basis, 1.0, mesh, 0, 16, seed=7, guidance=2.0,
                                   interval=(0.0, 0.88), num_steps=4, method="heun")


def generate_odd():
  """Images 3..7 of the same 16: a count that does not divide the devices (the index range is padded)."""
  model, params, basis = perturbed_tiny_model()
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
  return sampling.generate_on_mesh(model, params, basis, 1.0, mesh, 3, 5, seed=7, guidance=2.0,
                                   interval=(0.0, 0.88), num_steps=4, method="heun")


def main():
  np.savez(sys.argv[1], images=generate_images(), odd=generate_odd(), devices=jax.device_count())


if __name__ == "__main__":
  main()
