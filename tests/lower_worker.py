"""Lowers the ImageNet H/16 train step on an 8-device fake mesh without running it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lower_worker.py OUT.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from asymflow_jax import experiment, objective, sharding  # noqa: E402
from configs import imagenet256_h16  # noqa: E402


def main():
  config = imagenet256_h16.get_config()
  exp = experiment.build(config, sharding.make_mesh(config.mesh), training=True)
  lowered, shardings = objective.lower_train_step(exp), exp.shardings
  params = shardings.params
  text = lowered.as_text()
  out = dict(
      devices=jax.device_count(),
      qkv_spec=str(params["blocks_0"]["attn"]["qkv"]["kernel"].spec),
      opt_specs={jax.tree_util.keystr(k): str(v.spec) for k, v in jax.tree_util.tree_leaves_with_path(
          shardings.opt_state) if "blocks_0']['attn']['qkv']['kernel" in jax.tree_util.keystr(k)
          or "count" in jax.tree_util.keystr(k)},
      num_params=int(sum(x.size for x in jax.tree.leaves(exp.abstract.params))),
      has_bf16="bf16" in text,
      num_blocks=sum(1 for k in params if k.startswith("blocks_")),
  )
  with open(sys.argv[1], "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
