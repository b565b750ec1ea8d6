#!/usr/bin/env bash
# Launches asymflow_jax training on every worker of a Cloud TPU VM pod slice.
#
# usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] --config=FILE --workdir=DIR
#                          [--repo URL] [--branch BRANCH] [--dir REMOTE_DIR] [--no-setup] [--setup-only]
#                          [--detach] [--dry-run] [--config.KEY=VALUE ...] [-- EXTRA_TRAIN_ARGS...]
#
#   --tpu, --zone, --project   the TPU VM (env: TPU_NAME, ZONE, PROJECT)
#   --config=FILE[:ARG]        experiment config, relative to the repository (env: CONFIG)
#   --workdir=DIR              checkpoints/metrics folder, the same path on every worker: a shared
#                              mount (gcsfuse/Filestore) (env: WORKDIR)
#   --config.KEY=VALUE         config overrides, passed to every worker unchanged
#   --repo, --branch, --dir    what to clone/pull on the workers and where
#                              (env: REPO_URL, BRANCH [main], REMOTE_DIR [~/asymflow_jax])
#   --no-setup                 skip the git/venv/pip step;  --setup-only: only do it
#   --detach                   start training under nohup (log: REMOTE_DIR/logs/train.log on each
#                              worker) and return; default: stream worker output over ssh
#   --dry-run                  print the exact gcloud commands instead of running them (DRY_RUN=1)
#
# Every worker runs the same command; jax.distributed auto-detects the pod (process i = worker i).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

TPU_NAME="${TPU_NAME:-}"; ZONE="${ZONE:-}"; PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-}"; WORKDIR="${WORKDIR:-}"
REPO_URL="${REPO_URL:-https://github.com/YOUR_ORG/asymflow_jax.git}"; BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-~/asymflow_jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
DRY_RUN="${DRY_RUN:-0}"; SETUP=1; TRAIN=1; DETACH=0
OVERRIDES=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tpu|--tpu_name) TPU_NAME="$2"; shift 2 ;;
    --tpu=*|--tpu_name=*) TPU_NAME="${1#*=}"; shift ;;
    --zone) ZONE="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --project) PROJECT="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --repo) REPO_URL="$2"; shift 2 ;;
    --repo=*) REPO_URL="${1#*=}"; shift ;;
    --branch) BRANCH="$2"; shift 2 ;;
    --branch=*) BRANCH="${1#*=}"; shift ;;
    --dir) REMOTE_DIR="$2"; shift 2 ;;
    --dir=*) REMOTE_DIR="${1#*=}"; shift ;;
    --no-setup) SETUP=0; shift ;;
    --setup-only) TRAIN=0; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

missing=()
[[ -n "$TPU_NAME" ]] || missing+=(--tpu)
[[ -n "$ZONE" ]] || missing+=(--zone)
if [[ "$TRAIN" == 1 ]]; then
  [[ -n "$CONFIG" ]] || missing+=(--config)
  [[ -n "$WORKDIR" ]] || missing+=(--workdir)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_pod.sh: missing ${missing[*]}" >&2; usage >&2; exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD+=("--project=$PROJECT")
GCLOUD+=(--worker=all)

# REMOTE_DIR may start with ~ (expanded on the worker), so it is left unquoted there.
SETUP_CMD="set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin && git -C $REMOTE_DIR checkout -q $(printf %q "$BRANCH") && git -C $REMOTE_DIR pull -q --ff-only; else git clone -q --branch $(printf %q "$BRANCH") $(printf %q "$REPO_URL") $REMOTE_DIR; fi; cd $REMOTE_DIR; python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -r requirements.txt; .venv/bin/pip install -q --no-deps -e .; .venv/bin/pip install -q -U \"jax[tpu]==$JAX_VERSION\""

TRAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
QUOTED=""
for a in "${TRAIN_ARGS[@]}"; do QUOTED+=" $(printf %q "$a")"; done
PY_CMD=".venv/bin/python -m asymflow_jax.train$QUOTED"
if [[ "$DETACH" == 1 ]]; then
  TRAIN_CMD="cd $REMOTE_DIR && mkdir -p logs && nohup $PY_CMD >> logs/train.log 2>&1 < /dev/null & echo started on \$(hostname)"
else
  TRAIN_CMD="cd $REMOTE_DIR && mkdir -p logs && $PY_CMD 2>&1 | tee -a logs/train.log"
fi

shquote() {  # readable single-quoting for the dry run
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./=:@%+,~-]+$ ]]; then printf '%s' "$s"; else printf "'%s'" "${s//\'/\'\\\'\'}"; fi
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="" a
    for a in "$@"; do out+=" $(shquote "$a")"; done
    echo "${out# }"
  else
    "$@"
  fi
}

if [[ "$SETUP" == 1 ]]; then
  run "${GCLOUD[@]}" --command="$SETUP_CMD"
fi
if [[ "$TRAIN" == 1 ]]; then
  run "${GCLOUD[@]}" --command="$TRAIN_CMD"
fi
