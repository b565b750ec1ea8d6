"""The layer scan (``config.model.scan_layers``) against unrolled blocks, in one run: lowering and
compile seconds of the train step, and (unless --compile_only) the step time, timed interleaved.

    python bench/layer_scan.py                                         # the reference config, batch 16
    python bench/layer_scan.py --config=configs/imagenet256_h16.py --set batch_size=8 --compile_only

The step of ``common.build_train_step`` (allocated: parameters, optimizer state, a synthetic batch);
with --compile_only the abstract step of ``asymflow_jax.aot.compile_train_step`` (nothing allocated,
so H/16 compiles on a small host). Prints one JSON line with both variants and the scanned /
unrolled ratios (``compile_ratio``, ``step_time_ratio``).
"""

import argparse

import common
import jax

from asymflow_jax import aot


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "bench/reference_config.py")
  parser.add_argument("--compile_only", action="store_true", help="only lower and compile (no allocation)")
  parser.add_argument("--reps", type=int, default=10, help="timed steps per variant and round")
  parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  variants, steps = {}, {}
  for scan in (False, True):
    config = common.load_config(args.config, [*args.set, f"model.scan_layers={scan}"])
    if args.compile_only:   # abstract inputs: nothing allocated
      _, c = aot.compile_train_step(config, jax.devices())
      variants[scan] = dict(lower_s=c["lower_s"], compile_s=c["compile_s"], temp_bytes=c["memory"]["temp"])
    else:
      timings = {}
      compiled, state, batch, _ = common.build_train_step(config, timings=timings)
      variants[scan] = dict(**timings, temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
      steps[scan] = common.Stepper(compiled, state, batch)
  times = {False: [], True: []}
  for _ in range(args.rounds if steps else 0):
    for scan, step in steps.items():
      times[scan].extend(common.time_calls(step, warmup=args.warmup, reps=args.reps))
  for scan in steps:
    variants[scan]["step"] = common.stats(times[scan])
  unrolled, scanned = variants[False], variants[True]
  ratios = dict(lower=scanned["lower_s"] / unrolled["lower_s"], compile=scanned["compile_s"] / unrolled["compile_s"])
  if steps:
    ratios["step_time"] = scanned["step"]["median_ms"] / unrolled["step"]["median_ms"]
  common.emit("layer_scan", config=args.config, overrides=args.set, compile_ratio=ratios["compile"],
              step_time_ratio=ratios.get("step_time"), unrolled=unrolled, scanned=scanned,
              scanned_over_unrolled=ratios, devices=jax.device_count(),
              steps_timed=dict(rounds=args.rounds, reps=args.reps) if steps else None)


if __name__ == "__main__":
  main()
