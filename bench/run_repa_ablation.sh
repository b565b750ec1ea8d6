#!/usr/bin/env bash
# REPA evidence of docs/ablation.md: configs/ablation_mnist_repa.py with and without REPA, 3 seeds
# each (6 runs), then the mean ± std table and the band plot.   usage: bash bench/run_repa_ablation.sh [ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/repa}
PY=${PYTHON:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
$PY launch/sweep.py --config=configs/ablation_mnist_repa.py --workdir="$ROOT" --python "$PY" --keep_going \
    --sweep 'seed=0,1,2' --sweep 'repa.weight=0,0.5'
$PY bench/ablation_report.py "$ROOT" --out docs/ablation_repa \
    --title "REPA (VGG16 relu4_3) vs none: MNIST 32px, PCA r = 4, 3 seeds"
