"""Sample images from a training workdir's checkpoint (EMA weights by default).

    python -m asymflow_jax.sample --workdir=workdirs/demo --num=100 --guidance=2.0 [--steps=50 --method=heun]

Writes ``OUT.png`` (a grid) and ``OUT.npz`` (uint8 images (N, H, W, C) and labels). Sample i uses
the noise ``fold_in(key(seed), i)`` and label ``i % num_classes``, so the images do not depend on
the number of devices or hosts, nor on the batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections
import numpy as np

import jax

from asymflow_jax import distributed
from asymflow_jax import sampling
from asymflow_jax import sharding as shd
from asymflow_jax import train


def load_workdir(workdir: str, step: int | None = None):
  """(config, model, restored TrainState, mesh) from a training workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # sample on whatever devices are here
  mesh = shd.make_mesh(config.mesh)
  model = train.model_from_config(config)
  optimizer = train.make_optimizer(config)
  abstract = train.abstract_state(model, optimizer, config)
  shardings = train.state_shardings(model, optimizer, config, mesh, abstract)
  mngr = train.checkpoint_manager(workdir, config)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}.")
  state, _ = train.restore_checkpoint(mngr, abstract, shardings, step)
  mngr.close()
  return config, model, state, mesh


def generate_all(model, params, state, mesh, *, num: int, batch: int, seed: int, guidance: float, interval,
                 steps: int, method: str, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images (num, H, W, C) and labels, generated ``batch`` global indices at a time."""
  divisor = shd.batch_divisor(mesh)
  if batch % divisor:
    raise ValueError(f"--batch={batch} is not divisible by the {divisor} data-parallel devices.")
  chunks = range(0, num, batch)
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    chunks = tqdm(chunks, desc="sample", unit="batch", file=sys.stderr)
  images = np.concatenate([
      sampling.generate_on_mesh(model, params, state.basis, state.scale, mesh, start, batch, seed=seed,
                                guidance=guidance, interval=interval, num_steps=steps, method=method)
      for start in chunks])[:num]
  return images, (np.arange(num) % model.config.num_classes).astype(np.int32)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.sample", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--num", type=int, default=100)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the config's)")
  parser.add_argument("--interval", type=float, nargs=2, default=None, help="guidance interval in sigma (lo hi)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--method", choices=sampling.METHODS, default=None)
  parser.add_argument("--ema", type=int, default=0, help="EMA index (-1 = raw params)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="output prefix (default WORKDIR/samples/sample_STEP)")
  args = parser.parse_args(argv)
  distributed.initialize()  # multi-host: auto-detected (TPU pod, SLURM, JAX_* env); else a no-op

  config, model, state, mesh = load_workdir(args.workdir, args.step)
  c = config.sample
  params = state.params if args.ema < 0 else state.ema[args.ema]
  batch = min(args.batch, args.num + (-args.num) % shd.batch_divisor(mesh))
  batch += (-batch) % shd.batch_divisor(mesh)
  images, labels = generate_all(
      model, params, state, mesh, num=args.num, batch=batch, seed=args.seed,
      guidance=c.guidance if args.guidance is None else args.guidance,
      interval=tuple(c.interval) if args.interval is None else tuple(args.interval),
      steps=args.steps or c.num_steps, method=args.method or c.method)
  out = args.out or os.path.join(args.workdir, "samples", f"sample_{int(state.step):07d}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out + ".npz", images=images, labels=labels)
    cols = model.config.num_classes if args.num % model.config.num_classes == 0 else None
    sampling.save_png(out + ".png", images, cols=cols, upscale=max(1, 128 // model.config.input_size))
    print(f"wrote {out}.png and {out}.npz ({args.num} images, step {int(state.step)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
