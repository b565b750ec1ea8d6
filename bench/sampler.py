"""Sampler throughput: ``sampling.generate`` (one jitted fori_loop), Heun with classifier-free
guidance on the doubled batch, default 50 steps (2N - 1 = 99 network evaluations per image).

    python bench/sampler.py --config=configs/default.py --num=32 --steps=50
    python bench/sampler.py --config=bench/reference_config.py --num=64 --steps=50 --guidance=2.3 --interval=0,0.88

Random weights (the cost does not depend on them). img/s = images per second of the whole
sampling call; ``forward_img_per_s`` counts every network evaluation as the doubled CFG batch (with
an interval, an upper bound).
With ``--interval lo,hi`` narrower than [0, 1] (the ImageNet protocol guides sigma <= 0.88), the
same compiled sampler (the interval is traced) is also timed guiding every evaluation, in
alternating rounds, and ``interval_speedup`` = time guiding everywhere / time with the interval:
the gain of running only the conditional half outside the interval.
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
  parser.add_argument("--interval", default="0,1", help="CFG sigma interval lo,hi (inclusive)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()

  config = common.load_config(args.config, args.set)
  model = experiment.model_from_config(config)
  m = config.model
  params = jax.jit(lambda key: asymjit.init_params(model, key))(jax.random.key(0))   # one program, not one per op
  basis = jnp.asarray(subspace_lib.random_subspace(model.config.patch_dim, m.rank, seed=0))
  indices = jnp.arange(args.num)
  lo, hi = (float(v) for v in args.interval.split(","))
  guidance = jnp.float32(args.guidance)

  def call(interval):
    return sampling.generate(model, params, basis, jnp.float32(1.0), jax.random.key(1), indices, guidance,
                             (jnp.float32(interval[0]), jnp.float32(interval[1])), num_steps=args.steps,
                             method=args.method, cfg=True)

  times = {(lo, hi): [], (0.0, 1.0): []}   # one key when --interval is [0, 1]
  compare = len(times) == 2
  for r in range(2 if compare else 1):   # alternating rounds: (interval, everywhere, interval, everywhere)
    for interval in times:
      times[interval].extend(common.time_calls(lambda: call(interval), warmup=args.warmup if r == 0 else 0,
                                               reps=args.reps))
  st = common.stats(times[(lo, hi)])
  sec = st["median_ms"] / 1e3
  evals = sampling.num_evaluations(args.steps, args.method)
  flops = evals * model.config.forward_flops(2 * args.num)
  extra = {}
  if compare:
    everywhere = common.stats(times[(0.0, 1.0)])
    extra = dict(interval_speedup=everywhere["median_ms"] / st["median_ms"], call_guided_everywhere=everywhere)
  common.emit(
      "sampler", img_per_s=args.num / sec, method=args.method, steps=args.steps, cfg=True, guidance=args.guidance,
      interval=[lo, hi], num_images=args.num, network_evals=evals, forward_img_per_s=evals * 2 * args.num / sec,
      call=st, **extra, flops_analytic=flops, tflops_per_s_analytic=flops / sec / 1e12,
      model=dict(input_size=m.input_size, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                 rank=m.rank, dtype=m.dtype))


if __name__ == "__main__":
  main()
