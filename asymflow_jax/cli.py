"""Command-line pieces shared by the entry points (which never import each other)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import sys

from asymflow_jax import checkpoint
from asymflow_jax import sampling


def add_sampler_args(parser: argparse.ArgumentParser):
  """Sampler overrides shared with the evaluate CLI (default: the workdir config's ``sample`` section)."""
  parser.add_argument("--batch", type=int, default=100, help="images per compiled call (>= 1)")
  parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the config's)")
  parser.add_argument("--interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                      help="guidance interval in sigma, 0 <= LO <= HI <= 1")
  parser.add_argument("--steps", type=int, default=None, help="sampler steps (>= 1)")
  parser.add_argument("--method", choices=sampling.METHODS + ("unipc",), default=None,
                      help="euler | heun (class-conditional) or unipc (text-to-image)")
  parser.add_argument("--sigma_min", type=float, default=None,
                      help="recovery clamp at inference, 0 < SIGMA_MIN < 1 (default: the config's sample.sigma_min)")
  parser.add_argument("--ema", type=int, default=0, help="EMA index (-1 = raw params)")
  parser.add_argument("--seed", type=int, default=0)


def check_sampler_args(parser: argparse.ArgumentParser, args):
  """Range checks that argparse cannot express; parser.error exits 2 with the message."""
  if args.num < 1:
    parser.error(f"--num={args.num}: expected at least 1 image.")
  if args.batch < 1:
    parser.error(f"--batch={args.batch}: expected at least 1.")
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps={args.steps}: expected at least 1.")
  if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
    parser.error(f"--guidance={args.guidance}: expected a finite number >= 0.")
  if args.interval is not None:
    lo, hi = args.interval
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi <= 1):
      parser.error(f"--interval {lo} {hi}: expected 0 <= LO <= HI <= 1.")
  if args.sigma_min is not None and not (math.isfinite(args.sigma_min) and 0 < args.sigma_min < 1):
    parser.error(f"--sigma_min={args.sigma_min}: expected a number in (0, 1).")
  if args.ema < -1:
    parser.error(f"--ema={args.ema}: expected -1 (raw params) or an EMA index >= 0.")


def open_for_sampling(parser, args, step=None):
  """(config, experiment, state, sample settings) of ``args.workdir`` with the CLI overrides applied."""
  num_ema = len(checkpoint.read_config(args.workdir).ema_decays)
  if args.ema >= num_ema:
    parser.error(f"--ema={args.ema}: the run has {num_ema} EMA tree(s), indices 0..{num_ema - 1} (-1 = raw params).")
  weights = "params" if args.ema < 0 else f"ema_{args.ema}"
  config, exp, state = checkpoint.open_workdir(args.workdir, step=step, weights=weights)
  s = config.sample
  with s.unlocked():
    s.guidance = s.guidance if args.guidance is None else args.guidance
    s.interval = s.interval if args.interval is None else tuple(args.interval)
    s.num_steps = s.num_steps if args.steps is None else args.steps
    s.method = s.method if args.method is None else args.method
    s.sigma_min = s.sigma_min if args.sigma_min is None else args.sigma_min
  return config, exp, state, s


def load_config(spec: str, overrides=()):
  """``configs/X.py[:arg]`` -> its ``get_config(arg)``, then ``a.b=value`` overrides (Python
  literals, else strings); an override of a field that does not exist is an error naming it."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # configs/ import `configs.common`
  mod_spec = importlib.util.spec_from_file_location("asymflow_config_file", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg or None), overrides)


def apply_overrides(config, overrides=()):
  """``a.b=value`` overrides (Python literals, else strings) on a config, in place; an override of a
  field that does not exist is an error naming it. Returns the config."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. model.rank=8.")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *parents, leaf = key.split(".")
    node = config
    for part in parents + [leaf]:
      if part not in node:
        raise ValueError(f"override {item!r}: config.{key} does not exist.")
      if part != leaf:
        node = node[part]
    with node.unlocked():
      node[leaf] = value
  return config
