r"""Lift a diffusers FLUX.2 transformer into an AsymFLUX.2 pixel model and write it as a workdir.

Usage:
  python -m asymflow_jax.lift_flux2 --transformer=/ckpt/FLUX.2-klein-base-9B/transformer \
      --subspace=/data/procrustes_p16.npz --workdir=/ckpt/asymflux2_base \
      --config=configs/asymflux2_klein.py [--set model.input_size=512 ...]

Steps (spec sections 7-8): read the folder's config.json (it replaces ``config.model.flux2``, and
``model.rank`` becomes its token width); stream the tensors straight into their shardings on the
config's mesh (``asymflow_jax.flux2_import``; nothing is gathered on one host); lift x_embedder and
proj_out through the Procrustes basis U (rows put in the project's DiT pixel packing, columns in
the latent token order the checkpoint reads); write config.json + checkpoint step 0 (params,
basis, scale). ``train --config.finetune.base=WORKDIR`` finetunes it (AsymFlowVR, the lifted model
as the frozen teacher); ``sample --workdir=WORKDIR`` samples the lifted model.

Checked before anything is read or written: the workdir does not exist, the subspace's patch size,
channels and rank match the config and the checkpoint, and (in the importer) every key and shape.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from etils import epath

import jax

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import config as config_lib
from asymflow_jax import flux2_import
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from asymflow_jax.models import asymflux2, flux2


def base_config(config, latent: flux2.Flux2Config):
  """The workdir's config: ``config`` with the checkpoint's architecture, as a plain (un-finetuned)
  flow model, so sampling and evaluation open it directly."""
  c = config.copy_and_resolve_references()
  c.model.flux2 = config_lib.asymflux2_model_config(latent=latent).flux2
  c.model.rank = latent.in_channels
  c.objective = "flow"
  c.finetune.base, c.finetune.trainable, c.finetune.lr_mults = "", (), ()
  c.finetune.lora_rank, c.finetune.lora_targets = 0, ()
  return c


def lifted_basis(sub: subspace_lib.Subspace, config) -> np.ndarray:
  """U (D, d) with rows in DiT pixel packing; checks patch size, channels and rank."""
  m = config.model
  d = m.patch_size ** 2 * m.in_channels
  if sub.patch_size != m.patch_size or sub.dim != d or sub.rank != m.rank:
    raise ValueError(f"the subspace has patch {sub.patch_size}, D={sub.dim}, rank {sub.rank}; the config needs patch "
                     f"{m.patch_size}, D={d} (p*p*{m.in_channels}) and rank {m.rank} (the latent token width).")
  return np.asarray(sub.with_packing("dit").basis, np.float32)


def lift_to_workdir(transformer: str, subspace: str, workdir: str, config) -> dict:
  """Imports, lifts and writes; returns a summary. ``config`` is the experiment config (any mesh
  recipe; the tensors are placed by its logical-axis rules)."""
  if epath.Path(workdir).exists():
    raise ValueError(f"--workdir={workdir!r} already exists; choose a new folder (nothing was written).")
  latent = flux2_import.read_diffusers_config(transformer)
  config = base_config(config, latent)
  config_lib.validate_config(config, 1, training=False)
  sub = subspace_lib.Subspace.load(subspace)
  basis = lifted_basis(sub, config)
  params = flux2_import.load_diffusers_transformer(transformer, latent, shardings=shd.make_mesh(config.mesh))
  lifted = asymflux2.lift_flux2_params(params, basis)
  checkpoint.save_converted(workdir, config, lifted, basis, float(sub.scale))
  n = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(lifted))
  return dict(params=n, basis=basis.shape, scale=float(sub.scale))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.lift_flux2", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--transformer", required=True, help="diffusers FLUX.2 transformer/ folder")
  parser.add_argument("--subspace", required=True, help="Procrustes subspace .npz (python -m asymflow_jax.subspace)")
  parser.add_argument("--workdir", required=True, help="new workdir to write (must not exist)")
  parser.add_argument("--config", required=True, help="configs/X.py[:arg], e.g. configs/asymflux2_klein.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  args = parser.parse_args(argv)
  try:
    summary = lift_to_workdir(args.transformer, args.subspace, args.workdir, cli.load_config(args.config, args.set))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote workdir {args.workdir}: {summary['params']:,} params, basis {summary['basis']}, "
        f"scale {summary['scale']:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
