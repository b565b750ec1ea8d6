"""Collects a rank-ablation sweep into a markdown table and a PNG plot of FDD vs training step.

    python bench/ablation_report.py workdirs/ablation --out docs/ablation
    -> docs/ablation_table.md, docs/ablation_fdd.png

Every run folder holds metrics.jsonl (eval_fdd rows from config.eval) and config.json.
"""

from __future__ import annotations

import argparse
import json
import os


def load_runs(root: str) -> dict[str, dict]:
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
        if "loss" in row:
          losses[row["step"]] = row["loss"]
    m = config["model"]
    label = f"r={m['rank']} {config['subspace']['kind'] if 0 < m['rank'] < m['patch_size'] ** 2 * m['in_channels'] else ''}"
    runs[name] = dict(label=label.strip(), rank=m["rank"], kind=config["subspace"]["kind"], fdd=evals, loss=losses)
  return runs


def table(runs: dict[str, dict]) -> str:
  steps = sorted({s for r in runs.values() for s in r["fdd"]})
  head = "| run | " + " | ".join(f"FDD @ {s}" for s in steps) + " | final loss |"
  sep = "|---" * (len(steps) + 2) + "|"
  rows = []
  for r in sorted(runs.values(), key=lambda r: (r["kind"] != "pca", r["rank"])):
    last = r["loss"][max(r["loss"])] if r["loss"] else float("nan")
    rows.append(f"| {r['label']} | " + " | ".join(f"{r['fdd'].get(s, float('nan')):.1f}" for s in steps) +
                f" | {last:.4f} |")
  return "\n".join([head, sep] + rows) + "\n"


def plot(runs: dict[str, dict], path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in sorted(runs.values(), key=lambda r: (r["kind"] != "pca", r["rank"])):
    steps = sorted(r["fdd"])
    ax.plot(steps, [r["fdd"][s] for s in steps], marker="o", linestyle="-" if r["kind"] == "pca" else "--",
            label=r["label"])
  ax.set_xlabel("training step")
  ax.set_ylabel("Frechet Digit Distance (lower is better)")
  ax.set_yscale("log")
  ax.set_title("Rank ablation: MNIST 32px, patch 8 (D = 64), bottleneck 16", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("root")
  parser.add_argument("--out", default="docs/ablation")
  args = parser.parse_args()
  runs = load_runs(args.root)
  if not runs:
    raise SystemExit(f"no runs with metrics.jsonl under {args.root}")
  text = table(runs)
  with open(args.out + "_table.md", "w") as f:
    f.write(text)
  plot(runs, args.out + "_fdd.png")
  print(text)


if __name__ == "__main__":
  main()
