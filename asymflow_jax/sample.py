"""Sample images from a workdir (trained or converted): EMA weights by default.

    python -m asymflow_jax.sample --workdir=workdirs/demo --num=100 --guidance=2.0 [--steps=50 --method=heun]

Writes ``OUT.png`` (a grid) and ``OUT.npz`` (uint8 images (N, H, W, C) and labels). Sample i uses
the noise ``fold_in(key(seed), i)`` and label ``i % num_classes``, so the images do not depend on
the number of devices or hosts, nor on the batch size. Only the chosen weights and the subspace
are read from the checkpoint (never the optimizer state).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import jax
from etils import epath

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import distributed
from asymflow_jax import image_io
from asymflow_jax import sampling


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.sample", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--num", type=int, default=100)
  parser.add_argument("--out", default=None, help="output prefix (default WORKDIR/samples/sample_STEP)")
  cli.add_sampler_args(parser)
  args = parser.parse_args(argv)
  cli.check_sampler_args(parser, args)
  distributed.initialize()  # multi-host: auto-detected (TPU pod, SLURM, JAX_* env); else a no-op

  try:
    _, exp, state, settings = cli.open_for_sampling(parser, args, args.step)
    images = sampling.generate_from_config(exp.model, state.params, state.basis, state.scale, exp.mesh,
                                           sample_config=settings, num=args.num, seed=args.seed, batch=args.batch,
                                           progress=True,
                                           color_space=exp.config.model.color_space)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  labels = (np.arange(args.num) % exp.model.config.num_classes).astype(np.int32)
  out = args.out or str(epath.Path(args.workdir) / "samples" / f"sample_{int(state.step):07d}")
  if jax.process_index() == 0:
    image_io.save_npz(out + ".npz", images=images, labels=labels)
    cols = exp.model.config.num_classes if args.num % exp.model.config.num_classes == 0 else None
    image_io.save_png(out + ".png", images, cols=cols, upscale=max(1, 128 // exp.model.config.input_size))
    print(f"wrote {out}.png and {out}.npz ({args.num} images, step {int(state.step)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
