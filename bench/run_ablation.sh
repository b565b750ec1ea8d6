#!/usr/bin/env bash
# Rank ablation of docs/ablation.md: 7 runs of configs/ablation_mnist_p8.py, then the table and plot.
# ~35 minutes on 2 CPU cores.   usage: bash bench/run_ablation.sh [ROOT=workdirs/ablation]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/ablation}
PY=${PYTHON:-.venv/bin/python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
$PY launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir="$ROOT" --python "$PY" --keep_going \
    --sweep 'model.rank=0,2,4,8' --sweep 'subspace.kind=pca'
$PY launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir="$ROOT" --python "$PY" --keep_going \
    --sweep 'model.rank=4,8' --sweep 'subspace.kind=random'
$PY -m asymflow_jax.train --config=configs/ablation_mnist_p8.py --workdir="$ROOT/rank64_kind-pca" \
    --config.model.rank=64 --config.model.projected_init=False
$PY bench/ablation_report.py "$ROOT" --out docs/ablation
