"""Sampler throughput: ``sampling.generate`` (one jitted fori_loop), Heun with classifier-free
guidance on the doubled batch, default 50 steps (2N - 1 = 99 network evaluations per image).

    python bench/sampler.py --config=configs/default.py --num=32 --steps=50

Random weights (the cost does not depend on them). img/s = images per second of the whole
sampling call; ``forward_img_per_s`` counts every network evaluation of the doubled CFG batch.
"""

import argparse

import jax
import jax.numpy as jnp

import common
from asymflow_jax import experiment, sampling, subspace as subspace_lib  # noqa: E402
from asymflow_jax.models import asymjit  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "configs/default.py")
  parser.add_argument("--num", type=int, default=32, help="images per sampling call")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--method", default="heun", choices=sampling.METHODS)
  parser.add_argument("--guidance", type=float, default=2.0)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()

  config = common.load_config(args.config, args.set)
  model = experiment.model_from_config(config)
  m = config.model
  params = jax.jit(lambda key: asymjit.init_params(model, key))(jax.random.key(0))   # one program, not one per op
  basis = jnp.asarray(subspace_lib.random_subspace(model.config.patch_dim, m.rank, seed=0))
  indices = jnp.arange(args.num)
  guidance, interval = jnp.float32(args.guidance), (jnp.float32(0.0), jnp.float32(1.0))

  def call():
    return sampling.generate(model, params, basis, jnp.float32(1.0), jax.random.key(1), indices, guidance, interval,
                             num_steps=args.steps, method=args.method, cfg=True)

  st = common.stats(common.time_calls(call, warmup=args.warmup, reps=args.reps))
  sec = st["median_ms"] / 1e3
  evals = sampling.num_evaluations(args.steps, args.method)
  flops = evals * model.config.forward_flops(2 * args.num)
  common.emit(
      "sampler", img_per_s=args.num / sec, method=args.method, steps=args.steps, cfg=True, guidance=args.guidance,
      num_images=args.num, network_evals=evals, forward_img_per_s=evals * 2 * args.num / sec, call=st,
      flops_analytic=flops, tflops_per_s_analytic=flops / sec / 1e12,
      model=dict(input_size=m.input_size, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                 rank=m.rank, dtype=m.dtype))


if __name__ == "__main__":
  main()
