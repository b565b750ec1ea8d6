"""Per-device memory of a config's sharded train step, from XLA's memory analysis of the compiled
step on a fake CPU mesh of the recipe's size (no accelerator, nothing allocated: abstract inputs).

    python bench/memory.py --config=configs/asymflux2_klein.py:v5p-128 --devices=64
    python bench/memory.py --config=configs/asymflux2_klein.py:h100x32 --devices=32
    python bench/memory.py --config=configs/imagenet256_h16.py:v5p-64 --devices=32 --lower_only

Prints one JSON line: argument / output / aliased (donated) / temporary bytes per device as XLA's
CPU backend plans them, their sum minus the aliased bytes (the peak the step needs), parameter
counts (total, trained, frozen) and lowering / compile seconds. The CPU backend's buffer
assignment is not a TPU's or a GPU's (no HBM-specific layouts or fusions), so read the numbers as
the sharding plan's footprint, accurate for arguments and outputs and indicative for temporaries.
A finetuning config needs ``finetune.base``; here any non-empty value does (nothing is read).
"""

import os
import sys


def _devices_from_argv(default: int = 8) -> int:
  for i, a in enumerate(sys.argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(sys.argv):
      return int(sys.argv[i + 1])
  return default


# The fake device count must be set before jax is imported (bench/common.py imports it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={_devices_from_argv()}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402
import jax  # noqa: E402

from asymflow_jax import aot, experiment, objective  # noqa: E402
from asymflow_jax import sharding as shd  # noqa: E402


def _count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "configs/asymflux2_klein.py:cpu-8")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (the recipe's chip count)")
  parser.add_argument("--lower_only", action="store_true", help="lower without compiling (no memory numbers)")
  args = parser.parse_args()

  config = aot.placeholder_paths(common.load_config(args.config, args.set))
  t = time.time()
  exp = experiment.build(config, shd.make_mesh(config.mesh), training=True)
  lowered = objective.lower_train_step(exp)
  lower_s = time.time() - t
  trained = _count(exp.abstract.params)
  frozen = _count(exp.abstract.frozen.get("params", {})) if exp.abstract.frozen else 0   # the frozen base
  fields = dict(config=args.config, overrides=args.set, devices=args.devices,
                mesh=dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh, args.devices))),
                batch_size=config.batch_size, per_device_batch=config.batch_size // shd.batch_divisor(exp.mesh),
                params_trained=trained, params_frozen=frozen, lower_s=round(lower_s, 2))
  if not args.lower_only:
    t = time.time()
    mem = lowered.compile().memory_analysis()
    fields["compile_s"] = round(time.time() - t, 2)
    names = ("argument", "output", "alias", "temp", "generated_code")
    per = {n: int(getattr(mem, f"{n}_size_in_bytes")) for n in names}
    per["peak"] = per["argument"] + per["output"] - per["alias"] + per["temp"]
    fields["bytes_per_device"] = per
    fields["gib_per_device"] = {k: round(v / 2 ** 30, 2) for k, v in per.items()}
  common.emit("memory", **fields)


if __name__ == "__main__":
  main()
