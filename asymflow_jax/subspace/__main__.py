r"""Subspace command line: PCA, random and Procrustes subspaces to a subspace file, and ``info``.

  python -m asymflow_jax.subspace pca --images mnist --patch-size 4 --rank 8 --out subspace.npz
  python -m asymflow_jax.subspace random --patch-size 16 --channels 3 --rank 8 --out random.npz
  python -m asymflow_jax.subspace procrustes --images imgs.npz --latents lat.npz \
      --patch-size 16 --latent-patch-size 2 --out lifted.npz
  python -m asymflow_jax.subspace info subspace.npz
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import jax.numpy as jnp

from asymflow_jax import asymflow
from asymflow_jax.subspace import (Subspace, _check_rank, iterate_batches, load_image_array, pca_subspace,
                                   procrustes_subspace, random_subspace)

def _describe(sub: Subspace) -> str:
  lines = [f"rank {sub.rank}, dim {sub.dim} (patch {sub.patch_size}, {sub.channels} channels), scale {sub.scale:.6g}, "
           f"packing {sub.packing}", f"provenance {json.dumps(sub.provenance, sort_keys=True)}"]
  if sub.eigenvalues is not None:
    ev = np.sort(sub.eigenvalues)[::-1]
    energy = np.cumsum(ev) / ev.sum()
    ranks = sorted({r for r in (1, 2, 4, 8, 16, 32, 64, sub.rank) if r <= sub.dim})
    lines.append("energy captured by the top-r PCA directions: " +
                 ", ".join(f"r={r}: {energy[r - 1]:.3f}" for r in ranks if r > 0))
  return "\n".join(lines)


def _check_recovery(sub: Subspace, seed: int = 0) -> float:
  """Max |u - (eps - x0)| when the oracle u_A is fed through the recovery (should be round-off)."""
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 16, sub.dim)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((4, 16, sub.dim)), jnp.float32)
  sigma = jnp.asarray([1.0, 0.7, 0.3, 0.05], jnp.float32)
  basis = jnp.asarray(sub.basis)
  x_t = asymflow.add_noise(x0, eps, sigma)
  u_a = asymflow.project(eps, basis) - x0 / sub.scale
  u = asymflow.recover_velocity(u_a, x_t, basis, sigma, scale=sub.scale, sigma_min=asymflow.EVAL_SIGMA_MIN)
  return float(jnp.max(jnp.abs(u - (eps - x0))))


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.subspace", description=__doc__.split("\n", maxsplit=1)[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  pca = sub.add_parser("pca", help="top-r PCA directions of image patches")
  pca.add_argument("--images", required=True, help=".npy/.npz of images (uint8, or float in [0,1]) or 'mnist'")
  pca.add_argument("--key", default=None, help="array name inside an .npz")
  pca.add_argument("--patch-size", type=int, required=True)
  pca.add_argument("--rank", type=int, required=True)
  pca.add_argument("--num-images", type=int, default=10000, help="random subset size (reference: 10k)")
  pca.add_argument("--seed", type=int, default=2021)
  pca.add_argument("--batch-size", type=int, default=256)
  pca.add_argument("--float64", action="store_true", help="per-batch Gram in float64 on the host")
  pca.add_argument("--out", required=True)
  rnd = sub.add_parser("random", help="Haar-random orthonormal subspace")
  rnd.add_argument("--patch-size", type=int, required=True)
  rnd.add_argument("--channels", type=int, default=3)
  rnd.add_argument("--rank", type=int, required=True)
  rnd.add_argument("--seed", type=int, default=0)
  rnd.add_argument("--out", required=True)
  pro = sub.add_parser("procrustes", help="align pixel patches to latent tokens (latent lift)")
  pro.add_argument("--images", required=True, help=".npy/.npz pixel images, NHWC or NCHW")
  pro.add_argument("--latents", required=True, help=".npy/.npz latents (float), paired with --images")
  pro.add_argument("--patch-size", type=int, required=True)
  pro.add_argument("--latent-patch-size", type=int, required=True)
  pro.add_argument("--latent-layout", choices=("nchw", "nhwc"), default="nchw", help="layout of --latents")
  pro.add_argument("--batch-size", type=int, default=64)
  pro.add_argument("--dit-packing", action="store_true", help="store rows in DiT (py, px, c) order")
  pro.add_argument("--out", required=True)
  info = sub.add_parser("info", help="describe a subspace file and check the velocity recovery")
  info.add_argument("path")
  args = parser.parse_args(argv)

  if args.cmd == "info":
    s = Subspace.load(args.path)
    print(_describe(s))
    print(f"oracle recovery max |u - (eps - x0)| = {_check_recovery(s):.3g}")
    return 0
  if args.cmd == "pca":
    images = load_image_array(args.images, args.key)
    c = images.shape[-1]
    _check_rank(args.rank, args.patch_size ** 2 * c)
    batches = iterate_batches(images, args.batch_size, num=args.num_images, seed=args.seed)
    result = pca_subspace(batches, args.patch_size, args.rank, float64=args.float64, progress=True,
                          provenance=dict(images=args.images, num_images=min(args.num_images, len(images)),
                                          seed=args.seed))
  elif args.cmd == "random":
    result = random_subspace(args.patch_size ** 2 * args.channels, args.rank, seed=args.seed, patch_size=args.patch_size)
  else:
    images = load_image_array(args.images)
    latents = np.load(args.latents)
    latents = latents[latents.files[0]] if isinstance(latents, np.lib.npyio.NpzFile) else latents
    if latents.shape[0] != images.shape[0]:
      raise ValueError(f"{args.latents!r} has {latents.shape[0]} latents but {args.images!r} has {images.shape[0]} images.")
    if args.latent_layout == "nchw":
      latents = latents.transpose(0, 2, 3, 1)
    pairs = ((images[i:i + args.batch_size] * 2 - 1, latents[i:i + args.batch_size])
             for i in range(0, images.shape[0], args.batch_size))
    result = procrustes_subspace(pairs, args.patch_size, args.latent_patch_size, progress=True,
                                 provenance=dict(images=args.images, latents=args.latents))
    if args.dit_packing:
      result = result.with_packing("dit")
  result.save(args.out)
  print(_describe(result))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
