"""Train-step throughput (img/s) and model FLOPs utilisation of the project's jitted train step.

    python bench/train_step.py --config=configs/default.py --steps=20 --warmup=3
    python bench/train_step.py --config=configs/imagenet256_b16.py --set model.remat=False --set batch_size=256

FLOPs per step come from XLA's cost analysis of the compiled step (forward + backward + AdamW +
EMA, i.e. everything the step executes) and, as a cross-check, analytically (3x the matmul and
attention FLOPs of the forward). MFU = FLOPs per step / median step time / peak, with the peak from
``--peak_tflops``, the accelerator table in bench/common.py, or on CPU a float32 2048^3 matmul
measured in the same run (so on CPU "MFU" is a fraction of the measured matmul peak). XLA counts a
scanned loop body once: with ``model.scan_layers=True`` read ``mfu_analytic``. With
``--set steps_per_call=K`` each timed call runs K steps (``objective.train_steps``); times, img/s
and MFU are per step (XLA's count of the scanned K-step program is its one step body).
"""

import argparse

import common
from asymflow_jax.aot import xla_flops


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "configs/default.py")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  parser.add_argument("--peak_tflops", type=float, default=None, help="peak of all devices together")
  args = parser.parse_args()

  config = common.load_config(args.config, args.set)
  k = config.steps_per_call
  compiled, state, batch, model = common.build_train_step(config, steps_per_call=k)
  times = common.time_calls(common.Stepper(compiled, state, batch), warmup=args.warmup, reps=args.steps) / k
  st = common.stats(times)
  step_s = st["median_ms"] / 1e3
  flops = xla_flops(compiled)
  analytic = 3 * model.config.forward_flops(config.batch_size)
  peak, peak_src = common.peak_flops(args.peak_tflops)
  m = config.model
  common.emit(
      "train_step", img_per_s=config.batch_size / step_s, step=st, batch_size=config.batch_size, steps_per_call=k,
      model=dict(input_size=m.input_size, patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                 num_heads=m.num_heads, bottleneck_dim=m.bottleneck_dim, in_context_len=m.in_context_len,
                 rank=m.rank, dtype=m.dtype, remat=m.remat),
      flops_per_step_xla=flops, flops_per_step_analytic=analytic, flops_source="xla cost_analysis (fwd+bwd+opt)",
      tflops_per_s=flops / step_s / 1e12, peak_tflops=peak / 1e12, peak_source=peak_src,
      mfu=flops / step_s / peak, mfu_analytic=analytic / step_s / peak)


if __name__ == "__main__":
  main()
