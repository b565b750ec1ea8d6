#!/usr/bin/env python3
"""Runs N JAX processes on this machine (127.0.0.1) as one multi-process job.

    launch/local_multiprocess.py [--num_processes 2] [--devices_per_process 1] [--port PORT]
        [--module asymflow_jax.train | --script PATH] [--platform cpu] [--dry-run]
        -- --config=configs/default.py --workdir=workdirs/mp [--config.batch_size=64 ...]

Every process gets the arguments after ``--`` plus ``--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=K``
(K = --devices_per_process), so N x K CPU devices form one global mesh exactly as N hosts would.
Output lines are prefixed with ``[pI]``. If a process fails the others are killed and the exit
status is non-zero; SIGINT/SIGTERM are forwarded (SIGTERM lets the trainer save a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="launch/local_multiprocess.py", description=__doc__.split("\n\n")[0],
      usage="%(prog)s [options] -- TRAIN_ARGS...",
      epilog="example: %(prog)s --num_processes 2 --devices_per_process 2 -- "
             "--config=configs/default.py:runlocal --workdir=workdirs/mp")
  p.add_argument("--num_processes", "-n", type=int, default=2, help="number of JAX processes (default 2)")
  p.add_argument("--devices_per_process", "-k", type=int, default=1,
                 help="CPU devices per process via --xla_force_host_platform_device_count (default 1)")
  p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--module", default="asymflow_jax.train", help="python -m MODULE (default asymflow_jax.train)")
  g.add_argument("--script", default=None, help="run this python file instead of --module")
  p.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the children ('' = leave unset)")
  p.add_argument("--timeout", type=float, default=0, help="kill everything after this many seconds (0 = never)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands (with their environment) and exit")
  p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments after -- go to every process")
  args = p.parse_args(argv)
  if args.train_args and args.train_args[0] == "--":
    args.train_args = args.train_args[1:]
  if args.num_processes < 1 or args.devices_per_process < 1:
    p.error("--num_processes and --devices_per_process must be >= 1")
  return args


def commands(args, port: int) -> list[tuple[dict, list[str]]]:
  """(extra environment, argv) of every process."""
  target = [args.script] if args.script else ["-m", args.module]
  out = []
  for i in range(args.num_processes):
    env = {"XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                               f"--xla_force_host_platform_device_count={args.devices_per_process}"]))}
    if args.platform:
      env["JAX_PLATFORMS"] = args.platform
    argv = [args.python, *target, *args.train_args, f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={args.num_processes}", f"--process_id={i}"]
    out.append((env, argv))
  return out


def format_command(env: dict, argv: list[str]) -> str:
  return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def _pump(stream, prefix: str, sink):
  for line in iter(stream.readline, ""):
    sink.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
    sink.flush()
  stream.close()


def run(args) -> int:
  port = args.port or free_port()
  cmds = commands(args, port)
  if args.dry_run:
    for env, argv in cmds:
      print(format_command(env, argv))
    return 0
  procs, pumps = [], []
  pythonpath = os.pathsep.join(filter(None, [REPO, os.getcwd(), os.environ.get("PYTHONPATH", "")]))
  for i, (env, argv) in enumerate(cmds):
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=pythonpath, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(proc)
    t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", sys.stdout), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}

  start, failed = time.time(), None
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() not in (None, 0) and failed is None:
          failed = i
      if failed is not None or (args.timeout and time.time() - start > args.timeout):
        break
      time.sleep(0.2)
    if failed is None and any(p.poll() is None for p in procs):
      print(f"[launcher] timeout after {args.timeout:.0f}s; killing all processes", file=sys.stderr, flush=True)
      failed = -1
    if failed is not None:
      if failed >= 0:
        print(f"[launcher] process {failed} exited with {procs[failed].returncode}; stopping the others",
              file=sys.stderr, flush=True)
      for p in procs:   # the survivors would block in collectives until the heartbeat timeout
        if p.poll() is None:
          p.kill()
    for p in procs:
      p.wait()
    for t in pumps:
      t.join(timeout=5)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  codes = [p.returncode for p in procs]
  bad = [i for i, c in enumerate(codes) if c != 0]
  if bad:
    print(f"[launcher] failed processes {bad}, exit codes {codes}", file=sys.stderr, flush=True)
    return next((codes[i] for i in bad if codes[i] > 0), 1)
  return 0


def main(argv=None) -> int:
  return run(parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
