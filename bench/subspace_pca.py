"""Subspace PCA throughput: ``subspace.patch_gram`` (patchify + one jitted float32 HIGHEST-precision
Gram per batch, float64 sum on the host), images/s and tokens/s, plus the eigendecomposition.

    python bench/subspace_pca.py --image_size=256 --channels=3 --patch_size=16 --batch=32 --batches=16

Synthetic uniform images in [-1, 1] (the cost does not depend on the values); the same host batch
is fed ``--batches`` times so memory stays small. Median of ``--reps`` passes after one warm-up.
"""

import argparse

import numpy as np

import common
from asymflow_jax import subspace  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--channels", type=int, default=3)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()

  images = np.random.default_rng(0).uniform(
      -1, 1, (args.batch, args.image_size, args.image_size, args.channels)).astype(np.float32)
  run = lambda n: subspace.patch_gram((images for _ in range(n)), args.patch_size)
  run(1)  # compile
  st = common.stats(common.time_calls(lambda: run(args.batches)[0], warmup=0, reps=args.reps))
  gram, tokens = run(args.batches)
  eig = common.stats(common.time_calls(lambda: subspace.top_eigenvectors(gram, args.rank)[0], warmup=1,
                                       reps=args.reps))
  sec = st["median_ms"] / 1e3
  d = gram.shape[0]
  common.emit("subspace_pca", img_per_s=args.batch * args.batches / sec, tokens_per_s=tokens / sec,
              gflops_per_s=2.0 * tokens * d * d / sec / 1e9, patch_dim=d, tokens=tokens,
              images=args.batch * args.batches, image_shape=[args.image_size, args.image_size, args.channels],
              patch_size=args.patch_size, gram=st, eigh_ms=eig["median_ms"], rank=args.rank)


if __name__ == "__main__":
  main()
