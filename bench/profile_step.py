"""Where the train step's time goes: a ``jax.profiler`` trace of the compiled step, each executed HLO
instruction attributed to a phase of ``objective.train_step`` by its named scope.

    python bench/profile_step.py                      # the reference config (bench/reference_config.py)
    python bench/profile_step.py --config=configs/default.py --top=20

Phases (from the instruction's ``op_name`` metadata): forward (``loss_and_grad`` outside
``transpose``: the loss, sampling of sigma / noise / labels, the network), backward
(``transpose(jvp(...))``), optimizer (AdamW, clipping, the gradient norm), ema, nonfinite (the
finiteness check and the keep-or-skip selects; XLA fuses the EMA update into those selects, so its
time shows there), other (rng splits, metrics). Times are the summed
durations of the XLA CPU runtime's per-instruction events (all threads, per step), so a phase's
share is of the executed instruction time; the wall step time is reported beside it. On accelerators
use XProf on the same trace: the named scopes are the same.
"""

import argparse
import collections
import glob
import re
import tempfile

import common
import jax

PHASES = ("forward", "backward", "optimizer", "ema", "nonfinite", "other")


def phase(op_name: str) -> str:
  """The train-step phase of an instruction from its ``op_name`` metadata."""
  if "/loss_and_grad/" in op_name:
    return "backward" if "transpose(" in op_name else "forward"
  for scope, name in (("/optimizer/", "optimizer"), ("/ema/", "ema"), ("/nonfinite_check/", "nonfinite"),
                      ("/skip_nonfinite/", "nonfinite")):
    if scope in op_name:
      return name
  return "other"


def instructions(hlo_text: str) -> dict:
  """{instruction name: (opcode, op_name)} of every instruction of an HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*? ([\w-]+)\(", line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_config_args(parser, "bench/reference_config.py")
  parser.add_argument("--steps", type=int, default=5, help="traced steps")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--top", type=int, default=15, help="instructions listed")
  args = parser.parse_args()

  config = common.load_config(args.config, args.set)
  compiled, state, batch, _ = common.build_train_step(config)
  step = common.Stepper(compiled, state, batch)
  wall = common.stats(common.time_calls(step, warmup=args.warmup, reps=args.steps))
  hlo = instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(args.steps):
        jax.block_until_ready(step())
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    ns = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          if ev.name in hlo:
            ns[ev.name] += ev.duration_ns
  per_phase = collections.Counter()
  for name, t in ns.items():
    per_phase[phase(hlo[name][1])] += t
  total = sum(per_phase.values())
  ms = lambda t: t / 1e6 / args.steps
  top = [dict(name=n, opcode=hlo[n][0], phase=phase(hlo[n][1]), ms_per_step=ms(t), share=t / total,
              op_name=hlo[n][1][-120:]) for n, t in ns.most_common(args.top)]
  common.emit("profile_step", config=args.config, overrides=args.set, wall_step_ms=wall["median_ms"],
              instruction_ms_per_step=ms(total), instructions_seen=len(ns),
              phase_ms_per_step={p: ms(per_phase[p]) for p in PHASES},
              phase_share={p: per_phase[p] / total for p in PHASES}, top=top)


if __name__ == "__main__":
  main()
