r"""Score generated images: FID / Inception Score (with local Inception weights) or the offline FDD.

    # samples from a workdir's checkpoint (trained or converted), Frechet Digit Distance (embedded default)
    python -m asymflow_jax.evaluate --workdir=workdirs/demo --num=1000 --metric=fdd
    # an .npz of uint8 images (e.g. from asymflow_jax.sample) against ADM reference statistics
    python -m asymflow_jax.evaluate --images=samples.npz --metric=fid \
        --inception=fid_inception.npz --reference=VIRTUAL_imagenet256_labeled.npz

Every input (weights, reference statistics, image count) is checked before any image is generated.
Prints one JSON line (and writes it to ``--out`` if given). Statistics are float64; see
docs/evaluation.md for what each number means and how to produce the Inception weights file.
A non-finite score is an error (exit 1), never a result.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import jax
from etils import epath

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import distributed
from asymflow_jax import sampling
from asymflow_jax import scoring
from asymflow_jax.config import EVAL_METRICS


def _load_images(path: str) -> np.ndarray:
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"--images={path!r} does not exist.")
  with epath.Path(path).open("rb") as fh, np.load(fh) as f:
    key = "images" if "images" in f.files else "arr_0"
    if key not in f.files:
      raise ValueError(f"{path!r} has no 'images' or 'arr_0' array (it has {f.files}).")
    return f[key]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.evaluate", description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="generate from this workdir's latest checkpoint")
  src.add_argument("--images", help=".npz with uint8 images under 'images' (or 'arr_0')")
  parser.add_argument("--metric", choices=EVAL_METRICS, default="fdd")
  parser.add_argument("--num", type=int, default=1000, help="samples to generate (with --workdir)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (with --workdir; default: latest)")
  parser.add_argument("--inception", default=None, help="FID Inception weights .npz")
  parser.add_argument("--reference", default=None, help="reference statistics / images .npz (ADM format)")
  parser.add_argument("--classifier", default=None,
                      help="digit classifier cache for fdd (default: WORKDIR/digit_classifier.msgpack)")
  parser.add_argument("--out", default=None, help="also write the JSON result here")
  cli.add_sampler_args(parser)
  args = parser.parse_args(argv)
  cli.check_sampler_args(parser, args)
  distributed.initialize()  # multi-host: auto-detected (TPU pod, SLURM, JAX_* env); else a no-op

  try:
    images = None if args.workdir else _load_images(args.images)
    cache = args.classifier or (str(epath.Path(args.workdir) / "digit_classifier.msgpack") if args.workdir else None)
    scorer = scoring.make_scorer(args.metric, inception=args.inception, reference=args.reference,
                                 classifier_cache=cache, num_images=args.num if images is None else len(images))
    if images is None:
      _, exp, state, settings = cli.open_for_sampling(parser, args, args.step)
      images = sampling.generate_from_config(exp.model, state.params, state.basis, state.scale, exp.mesh,
                                             sample_config=settings, num=args.num, seed=args.seed,
                                             batch=args.batch, progress=True,
                                           color_space=exp.config.model.color_space)
    if jax.process_index() != 0:
      return 0
    result = scorer(images)
    if args.workdir:
      result["step"] = int(state.step)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  line = json.dumps(result)
  print(line)
  if args.out:
    epath.Path(args.out).write_text(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
