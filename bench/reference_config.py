"""The side-by-side config timed with the reference PyTorch implementation on the same 2-core CPU.

    python bench/reference_config.py                       # train step (batch 16) and forward (batch 64)
    python bench/train_step.py --config=bench/reference_config.py   # the same config through train_step.py

Exactly: input 64x64x3, patch 8 (D = 192), hidden 256, depth 6, heads 4, bottleneck 64, in-context
length 8, rank 8, float32; one AdamW train step at batch 16 and a forward at batch 64; median of
10 timed calls after 3 warm-ups. Fields the spec leaves open take the reference constructor's
defaults: in-context tokens from block 4, 1000 classes (+ null), SwiGLU ratio 4, no dropout.

The train step is the project's ``objective.train_step`` (sigma/label/noise sampling, AsymJiT forward
+ recovery, loss, backward, AdamW, one EMA update; no remat). The forward is ``asymjit_apply`` in
eval mode (JiT backbone + AsymFlow recovery), jitted. This file is also a config file
(``get_config``) for the other bench scripts.

``train_step_os``: the kernel-side cost per train step (system CPU ms, minor page faults) next to the
size of XLA's per-execution temporary buffer: on CPU each step faults in that buffer afresh
(bench/README.md, "Where the train step's time goes"). ``train_steps_per_call``: the same step
run ``--steps_per_call`` K times per device call (``config.steps_per_call``, a ``lax.scan``; timed
last, per step), which faults that buffer in once per call instead of once per step.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)
from asymflow_jax.aot import xla_flops  # noqa: E402
from configs import common as cfg_common  # noqa: E402


def get_config(arg=None):
  c = cfg_common.base_config()
  c.data = cfg_common.mnist_data()
  c.data.image_size, c.data.num_channels, c.data.num_classes = 64, 3, 1000
  c.model = cfg_common.model_config(
      "tiny", input_size=64, patch_size=8, in_channels=3, hidden_size=256, depth=6, num_heads=4,
      bottleneck_dim=64, in_context_len=8, in_context_start=4, num_classes=1000)
  c.model.rank = 8
  c.model.dtype = "float32"
  c.model.remat = False
  c.batch_size = 16
  c.ema_decays = (0.9999,)
  return cfg_common.apply_arg(c, arg)


def main():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from asymflow_jax import asymflow as af  # pylint: disable=import-outside-toplevel
  from asymflow_jax.models import asymjit  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--train_batch", type=int, default=16)
  parser.add_argument("--forward_batch", type=int, default=64)
  parser.add_argument("--steps_per_call", type=int, default=4,
                      help="also time K train steps per call (objective.train_steps); 1 = only single steps")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, for smoke tests only (the reference numbers use none)")
  args = parser.parse_args()

  config = common.apply_overrides(get_config(), args.set)
  config.batch_size = args.train_batch

  def time_train(k: int):
    """(compiled, stepper, model, per-step time stats, kernel-side cost per step) of the train step run
    k steps per call; the cost is read around the same timed calls (warm-ups included: compiled already)."""
    compiled, state, batch, model = common.build_train_step(config, steps_per_call=k)
    step = common.Stepper(compiled, state, batch)
    seconds, cost = common.os_cost(lambda: common.time_calls(step, warmup=args.warmup, reps=args.reps),
                                   (args.warmup + args.reps) * k)
    return compiled, step, model, common.stats(seconds / k), cost

  compiled, step, model, train_times, train_os = time_train(1)
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  flops = xla_flops(compiled)   # per step, from the single-step program
  peak, peak_src = common.peak_flops(None)

  b, m = args.forward_batch, config.model
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, m.input_size, m.input_size, m.in_channels)), jnp.float32)
  sigma = jnp.asarray(rng.uniform(0, 1, (b,)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, m.num_classes, (b,)), jnp.int32)
  fwd = jax.jit(lambda p, x, s, y, u: asymjit.asymjit_apply(model, p, x, s, y, u, sigma_min=af.EVAL_SIGMA_MIN))
  params, basis = step.state.params, step.state.basis
  fwd_c = fwd.lower(params, x, sigma, labels, basis).compile()
  fwd_times = common.stats(common.time_calls(lambda: fwd_c(params, x, sigma, labels, basis),
                                             warmup=args.warmup, reps=args.reps))

  # K steps per call (config.steps_per_call), last: the same updates; times and costs per step
  k = args.steps_per_call
  multi = None
  if k > 1:
    _, _, _, times_k, os_k = time_train(k)
    multi = dict(steps_per_call=k, step_ms=times_k["median_ms"], step=times_k,
                 fraction_of_peak=flops / (times_k["median_ms"] / 1e3) / peak,
                 img_per_s=args.train_batch / (times_k["median_ms"] / 1e3), os_per_step=os_k)

  step_s = train_times["median_ms"] / 1e3
  common.emit(
      "reference_config",
      train_step_ms=train_times["median_ms"], train_img_per_s=args.train_batch / step_s, train_batch=args.train_batch,
      forward_ms=fwd_times["median_ms"], forward_img_per_s=b / (fwd_times["median_ms"] / 1e3), forward_batch=b,
      train_step=train_times, forward=fwd_times,
      train_step_os=dict(train_os, xla_temp_mib=temp_mib), train_steps_per_call=multi,
      train_flops_per_step_xla=flops, forward_flops_xla=xla_flops(fwd_c),
      peak_tflops=peak / 1e12, peak_source=peak_src, train_fraction_of_peak=flops / step_s / peak,
      config=dict(input=f"{m.input_size}x{m.input_size}x{m.in_channels}", patch=m.patch_size, hidden=m.hidden_size,
                  depth=m.depth, heads=m.num_heads, bottleneck=m.bottleneck_dim, in_context_len=m.in_context_len,
                  in_context_start=m.in_context_start, num_classes=m.num_classes, rank=m.rank, dtype=m.dtype,
                  optimizer="AdamW", overrides=args.set, timing=f"median of {args.reps} after {args.warmup} warm-ups"))


if __name__ == "__main__":
  main()
