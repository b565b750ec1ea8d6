"""Runs a tiny training job in a fresh process (own device count) and dumps its parameters.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_worker.py WORKDIR STEPS OUT.npz [mesh]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import jax  # noqa: E402

from asymflow_jax import trainer  # noqa: E402
from tests import train_config  # noqa: E402


def main():
  workdir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  mesh = sys.argv[4] if len(sys.argv) > 4 else "1,-1,1"
  config = train_config.tiny_train_config(steps, repa=True)   # as the tiny_run fixture
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(v) for v in mesh.split(","))
  config.sample.num_images = 0   # the callers compare parameters and losses, never samples
  state = trainer.train(config, workdir, progress=False).state
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, num_devices=jax.device_count(), **flat)


if __name__ == "__main__":
  main()
