"""Overhead of the AsymFlow target + recovery over plain JiT: the same model and batch at rank 0
(JiT x0-prediction: basis (D, 0)) and rank r, timed in one process with interleaved repetitions.

    python bench/asymflow_overhead.py --config=bench/reference_config.py --rank=8 --pairs=30

Both train steps are compiled first; then ``--pairs`` pairs are timed, alternating the order
(AB, BA, AB, ...) so drift and cache effects hit both equally. Each pair gives a ratio
t(rank r) / t(rank 0); the reported overhead is median(ratio) - 1.
"""

import argparse

import numpy as np

import common


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "bench/reference_config.py")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--pairs", type=int, default=30)
  parser.add_argument("--inner", type=int, default=1, help="train steps per timed repetition")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  runs = {}
  for rank in (0, args.rank):
    config = common.load_config(args.config, [*args.set, f"model.rank={rank}"])
    stepper = common.Stepper(*common.build_train_step(config)[:3])

    def step(stepper=stepper):
      for _ in range(args.inner):
        loss = stepper()
      return loss
    common.time_calls(step, warmup=args.warmup, reps=0)
    runs[rank] = step

  times = {0: [], args.rank: []}
  for i in range(args.pairs):
    order = (0, args.rank) if i % 2 == 0 else (args.rank, 0)
    for rank in order:
      times[rank].append(common.time_calls(runs[rank], warmup=0, reps=1)[0] / args.inner)
  t0, tr = np.asarray(times[0]), np.asarray(times[args.rank])
  ratios = tr / t0
  common.emit(
      "asymflow_overhead", overhead=float(np.median(ratios) - 1), ratio_median=float(np.median(ratios)),
      ratio_p10=float(np.percentile(ratios, 10)), ratio_p90=float(np.percentile(ratios, 90)),
      ratio_of_medians=float(np.median(tr) / np.median(t0)), rank=args.rank, pairs=args.pairs, inner=args.inner,
      batch_size=config.batch_size, rank0_step=common.stats(t0), rank_step=common.stats(tr),
      target="overhead <= 0.02")


if __name__ == "__main__":
  main()
