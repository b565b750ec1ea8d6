"""Shared benchmark helpers: timing, the one-line JSON record, configs from files, FLOPs and MFU.

Every bench script prints exactly one JSON line (``emit``) with the measured numbers plus the
machine (platform, device kind, CPU model, core count), the jax version and the exact command.
Timings are wall-clock around calls that end in ``jax.block_until_ready``; compile time is never
counted (warm-up calls run first).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # `configs` and `asymflow_jax` from a fresh clone, no install needed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asymflow_jax import cli, experiment, objective  # noqa: E402
from asymflow_jax import sharding as shd, subspace as subspace_lib  # noqa: E402

# Dense peak TFLOP/s per device for the MFU denominator (bf16 unless noted), by device_kind substring.
PEAK_TFLOPS = {
    "H100": 989.0,     # H100 SXM bf16 dense
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6": 918.0,   # v6e (Trillium)
}


# ------------------------------------------------------------------------------------ timing


def time_calls(fn, *, warmup: int, reps: int) -> np.ndarray:
  """Seconds per call of ``fn()`` (its result is blocked on), after ``warmup`` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return np.asarray(out)


def os_cost(run, calls: int):
  """(``run()``, the process's kernel-side cost per call of the ``calls`` calls that ``run`` makes):
  system and user CPU ms and minor page faults (``getrusage``). On CPU, XLA allocates each
  execution's temporary buffer afresh, and every page of it faults on first touch: that cost shows
  here. Wrap the timing loop, e.g. ``os_cost(lambda: time_calls(fn, warmup=w, reps=r), w + r)``."""
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  out = run()
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return out, dict(sys_ms_per_call=(r1.ru_stime - r0.ru_stime) / calls * 1e3,
                   user_ms_per_call=(r1.ru_utime - r0.ru_utime) / calls * 1e3,
                   minor_faults_per_call=(r1.ru_minflt - r0.ru_minflt) / calls)


def stats(seconds) -> dict:
  """Median and spread of a list of durations, in milliseconds."""
  s = np.asarray(seconds) * 1e3
  return dict(median_ms=float(np.median(s)), p10_ms=float(np.percentile(s, 10)),
              p90_ms=float(np.percentile(s, 90)), min_ms=float(s.min()), reps=int(s.size))


# ------------------------------------------------------------------------------- the JSON line


def machine() -> dict:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return dict(platform=dev.platform, device_kind=dev.device_kind, num_devices=jax.device_count(),
              cpu=cpu, cpu_cores=os.cpu_count(), jax=jax.__version__)


def emit(bench: str, **fields) -> dict:
  """Prints one JSON line: the bench name, its numbers, the machine and the exact command."""
  rec = dict(bench=bench, **fields, **machine(),
             command=" ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]))
  print(json.dumps(rec, sort_keys=False), flush=True)
  return rec


# ------------------------------------------------------------------------------------- configs


def load_config(spec: str, overrides=()):
  """``configs/X.py[:arg]`` -> its config with ``key.sub=value`` overrides (``asymflow_jax.cli.load_config``),
  data fields made consistent with the model (benchmarks use synthetic batches)."""
  path, sep, arg = spec.partition(":")
  path = path if os.path.isabs(path) else os.path.join(REPO, path)
  return _synthetic_data(cli.load_config(path + sep + arg, overrides))


def apply_overrides(config, overrides=()):
  """``key.sub=value`` overrides on an existing config (``asymflow_jax.cli.apply_overrides``)."""
  return _synthetic_data(cli.apply_overrides(config, overrides))


def _synthetic_data(config):
  config.data.image_size, config.data.num_channels = config.model.input_size, config.model.in_channels
  return config


def add_config_args(parser, default: str):
  parser.add_argument("--config", default=default, help="configs/X.py[:arg]")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set model.rank=0 --set batch_size=64 (repeatable)")


# ------------------------------------------------------------------------------- FLOPs and MFU


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
  """Measured float32 FLOP/s of a jitted n^3 matmul on the default device (median of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return 2.0 * n ** 3 / float(np.median(time_calls(lambda: f(a, b), warmup=2, reps=reps)))


def peak_flops(peak_tflops: float | None, *, cpu_matmul_n: int = 2048) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): ``--peak_tflops``, the accelerator table, or on CPU a
  float32 matmul measured in this run."""
  if peak_tflops:
    return peak_tflops * 1e12, "flag --peak_tflops"
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return matmul_peak_flops(cpu_matmul_n), f"measured f32 {cpu_matmul_n}^3 matmul (this run)"
  for key, value in PEAK_TFLOPS.items():
    if key.lower() in dev.device_kind.lower():
      return value * 1e12 * jax.device_count(), f"table: {key} {value} TFLOP/s x {jax.device_count()} devices"
  raise ValueError(f"unknown accelerator {dev.device_kind!r}: pass --peak_tflops")


# ------------------------------------------------------------------------------- the train step


class Stepper:
  """``stepper()`` runs one compiled train step on the stepper's own state (donated and replaced)
  and returns the loss; ``stepper.state`` is the latest state."""

  def __init__(self, compiled, state, batch):
    self.compiled, self.state, self.batch = compiled, state, batch

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics["loss"]


def build_train_step(config, seed: int = 0, timings: dict | None = None, steps_per_call: int = 1):
  """The project's sharded train step for ``config`` on all local devices, with a random subspace
  of rank ``config.model.rank`` (the basis values do not change the cost) and a synthetic batch;
  ``steps_per_call`` K > 1: ``objective.train_steps`` over K copies of that batch.

  Returns (compiled step, state, batch, model); ``compiled(state, batch) -> (state, metrics)``
  donates ``state``. ``timings``, if given, receives ``lower_s`` and ``compile_s``.
  """
  mesh = shd.make_mesh(config.mesh)
  exp = experiment.build(config, mesh, training=True)
  model, m = exp.model, config.model
  sub = subspace_lib.random_subspace(model.config.patch_dim, m.rank, seed=seed, patch_size=m.patch_size)
  state = exp.init_state(sub)
  rng = np.random.default_rng(seed)
  b = config.batch_size
  local = dict(image=rng.uniform(-1, 1, (b, m.input_size, m.input_size, m.in_channels)).astype(np.float32),
               label=rng.integers(0, m.num_classes, (b,)).astype(np.int32))
  if steps_per_call > 1:
    local = {k: np.stack([v] * steps_per_call) for k, v in local.items()}
  batch = shd.global_batch(local, mesh, stacked_steps=steps_per_call > 1)
  t0 = time.perf_counter()
  lowered = objective.jit_train_step(exp, steps_per_call).lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  if timings is not None:
    timings.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
  return compiled, state, batch, model
