"""Score generated images: FID / Inception Score (with local Inception weights) or the offline FDD.

    # samples from a training workdir's checkpoint, Frechet Digit Distance (embedded default)
    python -m asymflow_jax.evaluate --workdir=workdirs/demo --num=1000 --metric=fdd
    # an .npz of uint8 images (e.g. from asymflow_jax.sample) against ADM reference statistics
    python -m asymflow_jax.evaluate --images=samples.npz --metric=fid \
        --inception=fid_inception.npz --reference=VIRTUAL_imagenet256_labeled.npz

Prints one JSON line (and writes it to ``--out`` if given). Statistics are float64; see
docs/evaluation.md for what each number means and how to produce the Inception weights file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from asymflow_jax import distributed

METRICS = ("fdd", "fid")


def score_images(images, metric: str, *, inception: str | None = None, reference: str | None = None,
                 classifier_cache: str | None = None, batch_size: int = 50) -> dict:
  """Scores images (uint8 [0, 255] or float [-1, 1], NHWC).

  ``fdd``: Frechet Digit Distance to the embedded MNIST digits (+ digit IS); ``classifier_cache``
  keeps the trained digit classifier. ``fid``: FID to ``reference`` (ADM .npz: mu/sigma, or arr_0
  images) and Inception Score, with Inception weights from the local ``inception`` .npz.
  """
  from asymflow_jax.evaluation import classifier, inception as inception_lib, metrics  # pylint: disable=import-outside-toplevel
  images = metrics.to_model_range(images)
  if metric == "fdd":
    r = classifier.digit_fd(images, cache_path=classifier_cache)
    return dict(metric="fdd", fdd=r["fdd"], digit_is=r["digit_is"], confidence=r["confidence"],
                num_images=r["num_images"])
  if metric != "fid":
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
  if not inception or not reference:
    raise ValueError("--metric=fid needs --inception (weights .npz, see docs/evaluation.md) and --reference "
                     "(ADM reference .npz with mu/sigma or arr_0 images).")
  variables = inception_lib.load_inception_npz(inception)
  feature_fn = metrics.make_feature_fn(inception_lib.InceptionV3().apply, variables, batch_size=batch_size)
  stats, logits = metrics.RunningStatistics(), []
  for start in range(0, images.shape[0], batch_size):
    feats, lg = feature_fn(images[start:start + batch_size])
    stats.update(feats)
    logits.append(lg)
  mu, sigma = stats.finalize()
  mu_ref, sigma_ref = metrics.load_reference_statistics(reference, feature_fn, batch_size=batch_size)
  is_mean, is_std = metrics.inception_score(np.concatenate(logits)[:, :1000])
  return dict(metric="fid", fid=metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref), inception_score=is_mean,
              inception_score_std=is_std, num_images=int(images.shape[0]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.evaluate", description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="generate from this training workdir's latest checkpoint")
  src.add_argument("--images", help=".npz with uint8 images under 'images' (or 'arr_0')")
  parser.add_argument("--metric", choices=METRICS, default="fdd")
  parser.add_argument("--num", type=int, default=1000, help="samples to generate (with --workdir)")
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--guidance", type=float, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--inception", default=None, help="FID Inception weights .npz")
  parser.add_argument("--reference", default=None, help="reference statistics / images .npz (ADM format)")
  parser.add_argument("--classifier", default=None,
                      help="digit classifier cache for fdd (default: WORKDIR/digit_classifier.msgpack)")
  parser.add_argument("--out", default=None, help="also write the JSON result here")
  args = parser.parse_args(argv)
  distributed.initialize()  # multi-host: auto-detected (TPU pod, SLURM, JAX_* env); else a no-op

  cache = args.classifier
  if args.workdir:
    from asymflow_jax import sample  # pylint: disable=import-outside-toplevel
    config, model, state, mesh = sample.load_workdir(args.workdir)
    c = config.sample
    batch = args.batch + (-args.batch) % sample.shd.batch_divisor(mesh)
    images, _ = sample.generate_all(model, state.ema[0], state, mesh, num=args.num, batch=batch, seed=args.seed,
                                    guidance=c.guidance if args.guidance is None else args.guidance,
                                    interval=tuple(c.interval), steps=args.steps or c.num_steps, method=c.method)
    cache = cache or os.path.join(args.workdir, "digit_classifier.msgpack")
  else:
    with np.load(args.images) as f:
      key = "images" if "images" in f.files else "arr_0"
      if key not in f.files:
        raise ValueError(f"{args.images!r} has no 'images' or 'arr_0' array (it has {f.files}).")
      images = f[key]
  result = score_images(images, args.metric, inception=args.inception, reference=args.reference,
                        classifier_cache=cache)
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
