"""Collects an ablation sweep into a markdown table and a PNG plot of FDD vs training step.

    python bench/ablation_report.py workdirs/ablation --out docs/ablation [--title TEXT]
    -> docs/ablation_table.md, docs/ablation_fdd.png

Every run folder holds metrics.jsonl (eval_fdd rows from config.eval) and config.json. Runs that
differ only in ``seed`` are one arm: with several seeds the table gives mean ± sample std (n) per
evaluation step and the plot a band of ± one std around the mean.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def arm_label(config: dict) -> str:
  """The arm of a run, from its config: rank and subspace kind (r = 0 and r = D have none), + REPA."""
  m = config["model"]
  label = f"r={m['rank']}"
  if 0 < m["rank"] < m["patch_size"] ** 2 * m["in_channels"]:
    label += f" {config['subspace']['kind']}"
  repa = config.get("repa", {})
  if repa.get("weight", 0) > 0:
    tap = f" relu{repa['vgg_tap'] + 1}" if repa["encoder"] == "vgg16" else ""
    label += f" + REPA ({repa['encoder']}{tap}, block {repa['block']}, weight {repa['weight']})"
  return label


def load_runs(root: str) -> dict[str, dict]:
  """{folder name: {label, seed, rank, kind, fdd {step: value}, loss {step: value}}}."""
  runs = {}
  for name in sorted(os.listdir(root)):
    metrics = os.path.join(root, name, "metrics.jsonl")
    if not os.path.exists(metrics):
      continue
    with open(os.path.join(root, name, "config.json")) as f:
      config = json.load(f)
    evals, losses = {}, {}
    with open(metrics) as f:
      for row in map(json.loads, f):
        if "eval_fdd" in row:
          evals[row["step"]] = row["eval_fdd"]
        if "loss" in row:   # the flow-matching term (without REPA's, which is negative)
          losses[row["step"]] = row.get("loss_flow", row["loss"])
    runs[name] = dict(label=arm_label(config), seed=config.get("seed", 0), rank=config["model"]["rank"],
                      kind=config["subspace"]["kind"], fdd=evals, loss=losses)
  return runs


def arms(runs: dict[str, dict]) -> list[dict]:
  """Runs grouped by label, in table order: {label, seeds, rank, kind, fdd {step: [per seed]}, loss [...]}."""
  groups: dict[str, dict] = {}
  for r in sorted(runs.values(), key=lambda r: r["seed"]):
    g = groups.setdefault(r["label"], dict(label=r["label"], seeds=[], rank=r["rank"], kind=r["kind"], fdd={},
                                           loss=[]))
    g["seeds"].append(r["seed"])
    for s, v in r["fdd"].items():
      g["fdd"].setdefault(s, []).append(v)
    if r["loss"]:
      g["loss"].append(r["loss"][max(r["loss"])])
  return sorted(groups.values(), key=lambda g: (g["kind"] != "pca", g["rank"], g["label"]))


def _cell(values: list[float], n_seeds: int, fmt: str = ".1f") -> str:
  """One value, or mean ± sample std over the seeds ("(n=k)" when only k of them reached it)."""
  if not values:
    return "n/a"
  if n_seeds == 1:
    return format(values[0], fmt)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
  return f"{format(float(np.mean(values)), fmt)} ± {format(std, fmt)}" + (
      "" if len(values) == n_seeds else f" (n={len(values)})")


def table(runs: dict[str, dict]) -> str:
  groups = arms(runs)
  steps = sorted({s for g in groups for s in g["fdd"]})
  multi = any(len(g["seeds"]) > 1 for g in groups)
  head = "| run | " + ("seeds | " if multi else "") + " | ".join(f"FDD @ {s}" for s in steps) + " | final flow loss |"
  sep = "|---" * (len(steps) + 2 + multi) + "|"
  rows = []
  for g in groups:
    n = len(g["seeds"])
    seeds = (", ".join(map(str, g["seeds"])) + " | ") if multi else ""
    rows.append(f"| {g['label']} | {seeds}" + " | ".join(_cell(g["fdd"].get(s, []), n) for s in steps) +
                f" | {_cell(g['loss'], n, '.4f')} |")
  note = "\n(mean ± sample standard deviation over the seeds)\n" if multi else ""
  return "\n".join([head, sep] + rows) + "\n" + note


def _crossing(fdd: dict[int, float], target: float) -> float | None:
  """First step at which FDD reaches ``target``: log-FDD interpolated linearly between the two
  evaluations around the crossing (the evaluation step itself when the first one is already below)."""
  steps = sorted(fdd)
  for i, s in enumerate(steps):
    if fdd[s] <= target:
      if i == 0:
        return float(s)
      s0, f0, f1 = steps[i - 1], np.log(fdd[steps[i - 1]]), np.log(fdd[s])
      return s0 + (f0 - np.log(target)) / (f0 - f1) * (s - s0)
  return None


def convergence(runs: dict[str, dict], reference: str = "r=0") -> str:
  """Steps each run needs to reach the final FDD of the ``reference`` arm's run with the same seed
  (see :func:`_crossing`), as a table: mean ± std over seeds, and the speed-up vs the reference."""
  final = {r["seed"]: r["fdd"][max(r["fdd"])] for r in runs.values() if r["label"] == reference and r["fdd"]}
  if not final:
    raise SystemExit(f"--convergence: no run of the reference arm {reference!r}")
  rows = ["| run | seeds | steps to reach r = 0's final FDD | per seed | speed-up vs r = 0 |", "|---|---|---|---|---|"]
  ref_steps = {}
  for g in arms(runs):
    per_seed = {}
    for r in runs.values():
      if r["label"] != g["label"] or r["seed"] not in final:
        continue
      per_seed[r["seed"]] = _crossing(r["fdd"], final[r["seed"]])
    if g["label"] == reference:
      ref_steps = per_seed
    reached = [v for v in per_seed.values() if v is not None]
    cell = _cell([float(v) for v in reached], len(per_seed), ".0f") if reached else "not reached"
    if reached and len(reached) < len(per_seed):
      cell += f", {len(per_seed) - len(reached)} not reached"
    speed = [ref_steps[s] / v for s, v in per_seed.items() if v and ref_steps.get(s)]
    rows.append(f"| {g['label']} | {', '.join(map(str, sorted(per_seed)))} | {cell} | "
                f"{', '.join('—' if per_seed[s] is None else f'{per_seed[s]:.0f}' for s in sorted(per_seed))} | "
                f"{_cell(speed, len(per_seed), '.2f') + '×' if speed else 'n/a'} |")
  return "\n".join(rows) + "\n"


def steps_to(runs: dict[str, dict], thresholds: list[float]) -> str:
  """Steps each arm needs to first reach each FDD level (see :func:`_crossing`): mean ± std over seeds,
  "not reached (k)" for the seeds that never got there within their run."""
  head = "| run | seeds | " + " | ".join(f"steps to FDD {t:g}" for t in thresholds) + " |"
  rows = [head, "|---" * (len(thresholds) + 2) + "|"]
  for g in arms(runs):
    mine = sorted((r for r in runs.values() if r["label"] == g["label"]), key=lambda r: r["seed"])
    cells = []
    for t in thresholds:
      hits = [_crossing(r["fdd"], t) for r in mine]
      reached = [float(h) for h in hits if h is not None]
      cell = _cell(reached, len(reached), ".0f") if reached else "not reached"
      if reached and len(reached) < len(hits):
        cell += f" ({len(hits) - len(reached)} not reached)"
      cells.append(cell)
    rows.append(f"| {g['label']} | {', '.join(str(r['seed']) for r in mine)} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def plot(runs: dict[str, dict], path: str, title: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for g in arms(runs):
    steps = sorted(g["fdd"])
    values = [np.asarray(g["fdd"][s]) for s in steps]
    mean = np.asarray([v.mean() for v in values])
    line, = ax.plot(steps, mean, marker="o", linestyle="-" if g["kind"] == "pca" else "--",
                    label=g["label"] + (f" ({len(g['seeds'])} seeds)" if len(g["seeds"]) > 1 else ""))
    if len(g["seeds"]) > 1:
      std = np.asarray([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel("training step")
  ax.set_ylabel("Frechet Digit Distance (lower is better)")
  ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("root")
  parser.add_argument("--out", default="docs/ablation")
  parser.add_argument("--convergence", action="store_true",
                      help="also the steps-to-reach-r=0's-final-FDD table (OUT_convergence.md)")
  parser.add_argument("--thresholds", default="",
                      help="comma-separated FDD levels: also the steps-to-reach-each-level table (OUT_steps_to.md)")
  parser.add_argument("--title", default="Rank ablation: MNIST 32px, patch 8 (D = 64), bottleneck 16")
  args = parser.parse_args()
  runs = load_runs(args.root)
  if not runs:
    raise SystemExit(f"no runs with metrics.jsonl under {args.root}")
  text = table(runs)
  with open(args.out + "_table.md", "w") as f:
    f.write(text)
  plot(runs, args.out + "_fdd.png", args.title)
  print(text)
  if args.thresholds:
    text = steps_to(runs, [float(t) for t in args.thresholds.split(",")])
    with open(args.out + "_steps_to.md", "w") as f:
      f.write(text)
    print(text)
  if args.convergence:
    text = convergence(runs)
    with open(args.out + "_convergence.md", "w") as f:
      f.write(text)
    print(text)


if __name__ == "__main__":
  main()
