#!/usr/bin/env bash
# Rank ablation of docs/ablation.md: configs/ablation_mnist_p8.py (800 steps, FDD every 200), 5 arms
# (r = 0, PCA r = 2 and 4, random r = 4, r = D = 64) x 3 seeds, then the mean ± std table, the
# convergence-speed table and the band plot. ~55 minutes on 2 CPU cores.
#   usage: bash bench/run_ablation.sh [ROOT=workdirs/ablation]      (SEEDS=0,1,2 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/ablation}
PY=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
SWEEP=($PY launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir="$ROOT" --python "$PY" --keep_going)
"${SWEEP[@]}" --sweep 'model.rank=0,4' --sweep "seed=$SEEDS"
"${SWEEP[@]}" --sweep 'model.rank=4' --sweep 'subspace.kind=random' --sweep "seed=$SEEDS"
"${SWEEP[@]}" --sweep 'model.rank=2' --sweep "seed=$SEEDS"
"${SWEEP[@]}" --sweep 'model.rank=D' --sweep 'model.projected_init=False' --sweep "seed=$SEEDS"
$PY bench/ablation_report.py "$ROOT" --out docs/ablation --convergence
