"""FDD of final checkpoints as a function of the inference recovery clamp sigma_min (docs/ablation.md).

    python bench/clamp_sensitivity.py workdirs/long --out docs/ablation_clamp [--steps 50] [--num 500] [--step 800]
    -> OUT.md (mean ± std over seeds per arm and clamp) and OUT.jsonl (one line per run and clamp)

For every run folder under ROOT (as bench/ablation_report.py groups them: runs that differ only in
``seed`` are one arm), samples ``--num`` class-balanced EMA images from the latest checkpoint (or
``--step``) with each ``--sigma_min`` value and scores them with the Frechet Digit Distance,
through the evaluate CLI (``python -m asymflow_jax.evaluate --workdir=RUN --step=S --sigma_min=V``),
so each number is reproducible one at a time. The clamp only acts where the sampler evaluates sigma < sigma_min: with N uniform
Heun steps the smallest evaluated sigma is 1/N, hence the default of 50 steps (the ImageNet
protocol's count; sigma down to 0.02).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import ablation_report
from asymflow_jax import evaluate


def _latest_step(workdir: str) -> int:
  """The step of the newest checkpoint (what the evaluate CLI samples from)."""
  return max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("root")
  p.add_argument("--out", default="docs/ablation_clamp")
  p.add_argument("--sigma_min", type=float, nargs="+", default=[1e-4, 1e-2, 4e-2, 1e-1])
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--num", type=int, default=500)
  p.add_argument("--method", default="heun")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of every run (default: each run's latest)")
  args = p.parse_args(argv)
  runs = ablation_report.load_runs(args.root)
  if not runs:
    raise SystemExit(f"no runs with metrics.jsonl under {args.root}")
  rows = []
  done = {}
  if os.path.exists(args.out + ".jsonl"):      # resume: keep the (run, clamp) pairs already scored
    with open(args.out + ".jsonl") as f:
      for row in map(json.loads, f):
        done[(row["run"], row["sigma_min"], row["steps"], row["num"], row["step"])] = row
  for name, run in runs.items():
    for sm in args.sigma_min:
      step = args.step if args.step is not None else _latest_step(os.path.join(args.root, name))
      key = (name, sm, args.steps, args.num, step)
      if key not in done:
        res = os.path.join(args.root, name, f"clamp_{sm:g}_{args.steps}_{step}.json")
        rc = evaluate.main([f"--workdir={os.path.join(args.root, name)}", "--metric=fdd", f"--num={args.num}",
                            f"--steps={args.steps}", f"--method={args.method}", f"--sigma_min={sm}",
                            f"--step={step}", f"--out={res}"])
        if rc != 0:
          raise SystemExit(f"evaluate failed for {name} at sigma_min={sm}")
        with open(res) as f:
          fdd = json.load(f)["fdd"]
        done[key] = dict(run=name, label=run["label"], seed=run["seed"], sigma_min=sm, steps=args.steps,
                         num=args.num, step=step, fdd=fdd)
        with open(args.out + ".jsonl", "a") as f:
          f.write(json.dumps(done[key]) + "\n")
        print(json.dumps(done[key]), flush=True)
      rows.append(done[key])
  print(write_table(rows, args))
  return 0


def write_table(rows: list[dict], args) -> str:
  labels = list(dict.fromkeys(r["label"] for r in rows))
  head = ("| run | seeds | checkpoint step | " + " | ".join(f"σ_min = {v:g}" for v in args.sigma_min)
          + " | worst / best |")
  lines = [head, "|---" * (len(args.sigma_min) + 4) + "|"]
  for label in labels:
    mine = [r for r in rows if r["label"] == label]
    seeds = sorted({r["seed"] for r in mine})
    cells, means = [], []
    for v in args.sigma_min:
      vals = [r["fdd"] for r in mine if r["sigma_min"] == v]
      means.append(float(np.mean(vals)))
      cells.append(ablation_report._cell(vals, len(seeds)))   # pylint: disable=protected-access
    # the spread of the clamp effect per seed: worst over best clamp, then mean ± std over seeds
    ratios = [max(r["fdd"] for r in mine if r["seed"] == s) / min(r["fdd"] for r in mine if r["seed"] == s)
              for s in seeds]
    lines.append(f"| {label} | {', '.join(map(str, seeds))} | {mine[0]['step']} | " + " | ".join(cells)
                 + f" | {ablation_report._cell(ratios, len(seeds), '.3f')}× |")   # pylint: disable=protected-access
  text = "\n".join(lines) + (f"\n\n(FDD of {args.num} EMA samples, {args.method} with {args.steps} steps; mean ± "
                             "sample standard deviation over the seeds)\n")
  with open(args.out + ".md", "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  sys.exit(main())
