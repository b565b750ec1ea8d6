#!/usr/bin/env bash
# Every benchmark with CPU-sized defaults (~3 minutes on 2 idle cores, < 10 minutes from a fresh clone);
# each prints one JSON line, collected in bench/results/cpu.jsonl (or $1).
#   usage: bash bench/run_all.sh [OUT=bench/results/cpu.jsonl]      (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-bench/results/cpu.jsonl}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
run() { echo "+ $*" >&2; "$PY" "$@" | tail -n 1 | tee -a "$OUT"; }

run bench/train_step.py --config=bench/reference_config.py --steps=20 --warmup=3
run bench/train_step.py --config=configs/default.py --steps=10 --warmup=2
run bench/asymflow_overhead.py --config=bench/reference_config.py --rank=8 --pairs=30
run bench/reference_config.py
run bench/layer_scan.py
run bench/sampler.py --config=configs/default.py --num=32 --steps=50 --method=heun --guidance=2.0
run bench/sampler.py --config=bench/reference_config.py --num=8 --steps=50 --guidance=2.3 --interval=0,0.88 --reps=2
run bench/data_pipeline.py --source=mnist --batch_size=128 --batches=100
run bench/data_pipeline.py --source=array_record --num_threads=0 --batch_size=32 --batches=10 --num_records=384
run bench/data_pipeline.py --source=array_record --num_threads=2 --batch_size=32 --batches=10 --num_records=384
run bench/subspace_pca.py --image_size=256 --channels=3 --patch_size=16 --batch=32 --batches=16
echo "wrote $OUT" >&2
