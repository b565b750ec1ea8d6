#!/usr/bin/env python3
"""Expands a hyperparameter sweep into the cartesian product of training runs.

    launch/sweep.py --config=configs/default.py --workdir=workdirs/sweep \
        --sweep 'model.rank=0,4,8,16,D' --sweep 'subspace.kind=pca,random' [--dry-run] \
        [--launcher direct|local|tpu|slurm] [-- --config.num_steps=1000 ...]

Each ``--sweep KEY=V1,V2,...`` is one axis; ``D`` as a value of ``model.rank`` (or any key) means
the patch dimension D = patch_size^2 * in_channels of the config (after the fixed overrides).
Every run gets its own workdir ``WORKDIR/<leaf><value>_<leaf>-<value>...`` (numbers are glued
to the key, strings joined with '-'; e.g. ``workdirs/sweep/rank8_kind-pca``) and the overrides
``--config.KEY=VALUE``. Arguments after ``--`` are passed to every run unchanged.

Launchers: ``direct`` runs ``python -m asymflow_jax.train`` here, one run after the other;
``local`` runs each through ``launch/local_multiprocess.py`` (``--num_processes``); ``tpu``
through ``launch/tpu_pod.sh`` (sequentially; put the TPU name/zone in the environment or in
``--launcher_args``); ``slurm`` submits one ``sbatch launch/slurm_gpu.sbatch`` job per run.
``--dry-run`` prints the exact commands and runs nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --config=FILE --workdir=ROOT --sweep KEY=V1,V2 [...] "
                                    "[--dry-run] [-- EXTRA_TRAIN_ARGS...]",
                              epilog="example: %(prog)s --config=configs/default.py --workdir=workdirs/sweep "
                                     "--sweep 'model.rank=0,4,8,16,D' --sweep 'subspace.kind=pca,random' --dry-run")
  p.add_argument("--config", required=True, help="config file, optionally FILE:ARG (e.g. configs/default.py:runlocal)")
  p.add_argument("--workdir", required=True, help="root folder (or gs:// prefix) for the runs' workdirs")
  p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="one sweep axis (repeatable); D = the patch dimension")
  p.add_argument("--launcher", choices=("direct", "local", "tpu", "slurm"), default="direct")
  p.add_argument("--num_processes", type=int, default=2, help="for --launcher=local")
  p.add_argument("--devices_per_process", type=int, default=1, help="for --launcher=local")
  p.add_argument("--launcher_args", default="", help="extra arguments for the launcher script (one string)")
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--keep_going", action="store_true", help="continue with the next run when one fails")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
  p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to every run")
  args = p.parse_args(argv)
  if args.extra and args.extra[0] == "--":
    args.extra = args.extra[1:]
  if not args.sweep:
    p.error("give at least one --sweep KEY=V1,V2,...")
  return args


# ------------------------------------------------------------------------------------- config


def load_config(spec: str):
  """``get_config(arg)`` of a config file given as FILE or FILE:ARG."""
  path, _, arg = spec.partition(":")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)      # configs import `configs.common`
  mod_spec = importlib.util.spec_from_file_location("_sweep_config", os.path.join(REPO, path)
                                                    if not os.path.isabs(path) and not os.path.exists(path) else path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _fixed_overrides(extra) -> dict:
  out = {}
  for a in extra:
    m = re.fullmatch(r"--config\.([\w.]+)=(.*)", a)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def patch_dim(config, overrides: dict) -> int:
  p = int(overrides.get("model.patch_size", _get(config, "model.patch_size")))
  c = int(overrides.get("model.in_channels", _get(config, "model.in_channels")))
  return p * p * c


# -------------------------------------------------------------------------------------- sweep


def parse_axis(text: str) -> tuple[str, list[str]]:
  key, sep, values = text.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  vals = [v.strip() for v in values.split(",") if v.strip()]
  if not sep or not re.fullmatch(r"[\w.]+", key) or not vals:
    raise SystemExit(f"bad --sweep {text!r}: expected KEY=V1,V2,... (e.g. model.rank=0,4,8,D)")
  return key, vals


def _is_number(v: str) -> bool:
  return re.fullmatch(r"-?\d+(\.\d+)?([eE]-?\d+)?", v) is not None


def run_name(assignment: list[tuple[str, str]], labels: dict) -> str:
  parts = []
  for key, value in assignment:
    label = labels[key]
    safe = re.sub(r"[^A-Za-z0-9.+-]", "-", value)
    parts.append(f"{label}{safe}" if _is_number(value) else f"{label}-{safe}")
  return "_".join(parts)


def expand(config, axes: list[tuple[str, list[str]]], workdir: str, fixed: dict) -> list[dict]:
  """[{name, workdir, overrides: [(key, value)]}] for the cartesian product (duplicates dropped)."""
  d = None
  resolved = []
  for key, vals in axes:
    out = []
    for v in vals:
      if v == "D":
        d = patch_dim(config, fixed) if d is None else d
        v = str(d)
      if v not in out:
        out.append(v)
    resolved.append((key, out))
  leaves = [k.rsplit(".", 1)[-1] for k, _ in resolved]
  labels = {k: (leaf if leaves.count(leaf) == 1 else k.replace(".", "-")) for (k, _), leaf in zip(resolved, leaves)}
  runs = []
  for combo in itertools.product(*(vals for _, vals in resolved)):
    assignment = list(zip((k for k, _ in resolved), combo))
    name = run_name(assignment, labels)
    runs.append(dict(name=name, workdir=f"{workdir.rstrip('/')}/{name}", overrides=assignment))
  return runs


def run_command(args, run: dict) -> list[str]:
  train_args = [f"--config={args.config}", f"--workdir={run['workdir']}",
                *(f"--config.{k}={v}" for k, v in run["overrides"]), *args.extra]
  extra_launcher = shlex.split(args.launcher_args)
  if args.launcher == "direct":
    return [args.python, "-m", "asymflow_jax.train", *train_args]
  if args.launcher == "local":
    return [args.python, os.path.join("launch", "local_multiprocess.py"), f"--num_processes={args.num_processes}",
            f"--devices_per_process={args.devices_per_process}", *extra_launcher, "--", *train_args]
  if args.launcher == "tpu":
    return ["bash", os.path.join("launch", "tpu_pod.sh"), *extra_launcher, *train_args]
  return ["sbatch", f"--job-name=asymflow-{run['name']}", *extra_launcher, os.path.join("launch", "slurm_gpu.sbatch"),
          *train_args]


def main(argv=None) -> int:
  args = parse_args(argv)
  axes = [parse_axis(s) for s in args.sweep]
  config = load_config(args.config)
  for key, _ in axes:
    try:
      _get(config, key)
    except (KeyError, AttributeError):
      raise SystemExit(f"--sweep key {key!r} is not in the config {args.config}") from None
  runs = expand(config, axes, args.workdir, _fixed_overrides(args.extra))
  if any("D" in vals for _, vals in axes):
    print(f"# D = patch_size^2 * in_channels = {patch_dim(config, _fixed_overrides(args.extra))} "
          "(repeated values are run once)")
  print(f"# {len(runs)} runs", flush=True)
  failures = []
  for i, run in enumerate(runs):
    cmd = run_command(args, run)
    line = " ".join(map(shlex.quote, cmd))
    if args.dry_run:
      print(line)
      continue
    print(f"# [{i + 1}/{len(runs)}] {run['name']}\n{line}", flush=True)
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
      failures.append(run["name"])
      print(f"# run {run['name']} failed with exit code {rc}", file=sys.stderr, flush=True)
      if not args.keep_going:
        return rc
  if failures:
    print(f"# failed runs: {failures}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
