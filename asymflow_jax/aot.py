r"""Ahead-of-time compilation of a config's train step (and sampler) for a real TPU topology, on any host.

    python -m asymflow_jax.aot --config=configs/imagenet256_h16.py:v5p-64 --topology=v5p-64
    python -m asymflow_jax.aot --config=configs/imagenet256_b16.py:v4-32 --topology=v4-32 --sampler
    python -m asymflow_jax.aot --config=configs/default.py --topology=cpu-8 --config.batch_size=64

``--topology``: a TPU slice name as Cloud TPU spells it (``v4-32``, ``v5p-64``: v4/v5p names count
TensorCores, two per chip, one JAX device per chip; ``v5e-64``, ``v6e-64``: chips), compiled with
the real TPU compiler from the ``libtpu`` wheel (``pip install .[tpu-aot]``; no TPU needed), or
``cpu-N``: N fake CPU devices (the XLA CPU compiler; no libtpu). ``--num_slices`` replicates the
slice over a data-center network (multislice). The config's mesh recipe is laid over the
topology's devices exactly as training would; nothing is allocated (abstract inputs).

Prints a table and one JSON line (``--out`` also writes it): per-chip argument / output / temporary /
generated-code bytes from XLA's memory analysis against the chip's HBM, the FLOPs of one step per
chip from XLA's cost analysis and (JiT) the model's analytic FLOPs, the step-time lower bound at the
chip's bf16 peak (the larger of the two counts), the MFU ceiling (model FLOPs / compiled FLOPs: what
remat's recomputation leaves; n/a where XLA counts fewer than the model's), and the lowering and
compile seconds. Exit status 1 when the step does not fit the chip, with the biggest terms and what to
change. XLA counts a scanned loop body once, so the FLOPs of layer-scanned models (FLUX.2,
DINOv2 inside REPA, JiT with ``model.scan_layers``) are lower bounds; the step-time bound then rests
on the model count.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

# Which TPU each slice name is; HBM and bf16 peak per chip (Cloud TPU system architecture pages).
_GENERATIONS = {   # name prefix: (libtpu topology prefix, TensorCores per chip in the name, HBM GiB, TFLOP/s)
    "v4": ("v4", 2, 32, 275.0),
    "v5p": ("v5", 2, 95, 459.0),
    "v5e": ("v5e", 1, 16, 197.0),
    "v6e": ("v6e", 1, 32, 918.0),
}
# Physical chip grids of the slice sizes (3D tori for v4/v5p, 2D for v5e/v6e), 4 chips per host.
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  platform: str                 # "tpu" or "cpu"
  chips: int                    # per slice
  libtpu_name: str | None       # e.g. "v5:2x4x4"
  chip_config: str | None       # "megacore" (v4, v5p: the two TensorCores of a chip as one device) or "default"
  wrap: tuple | None            # torus wrap-around per dimension (full cubes only)
  hbm_bytes: int | None
  peak_flops: float | None      # bf16 FLOP/s per chip


def parse_topology(name: str) -> Topology:
  """``v5p-64`` / ``v4-32`` / ``v5e-64`` / ``v6e-64`` / ``cpu-8`` -> :class:`Topology`; a clear error otherwise."""
  m = re.fullmatch(r"cpu-(\d+)", name)
  if m and int(m.group(1)) >= 1:
    return Topology(name, "cpu", int(m.group(1)), None, None, None, None, None)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"--topology={name!r}: expected a TPU slice name such as v4-32, v5p-64, v5e-64, v6e-64, "
                     "or cpu-N (N fake CPU devices).")
  prefix, cores_per_chip, hbm_gib, tflops = _GENERATIONS[m.group(1)]
  count = int(m.group(2))
  chips, rem = divmod(count, cores_per_chip)
  grids = _GRIDS_3D if cores_per_chip == 2 else _GRIDS_2D
  if rem or chips not in grids:
    sizes = sorted(k * cores_per_chip for k in grids)
    raise ValueError(f"--topology={name!r}: no {m.group(1)} slice of that size here; expected one of "
                     f"{', '.join(f'{m.group(1)}-{s}' for s in sizes)}.")
  grid = grids[chips]
  # torus links: a 3D slice wraps around only as a full cube of >= 4 per side; a 2D one per side of 16
  wrap = (min(grid) >= 4,) * 3 if len(grid) == 3 else (grid[0] >= 16, grid[1] >= 16, False)
  return Topology(name, "tpu", chips, f"{prefix}:{'x'.join(map(str, grid))}",
                  "megacore" if cores_per_chip == 2 else "default", wrap, hbm_gib * 2 ** 30, tflops * 1e12)


def _argv_value(flag: str, argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(flag + "="):
      return a.split("=", 1)[1]
    if a == flag and i + 1 < len(argv):
      return argv[i + 1]
  return None


if __name__ == "__main__":   # fake CPU devices must be requested before jax is imported
  _topo = _argv_value("--topology", sys.argv)
  if _topo and re.fullmatch(r"cpu-\d+", _topo):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_topo[4:]}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from asymflow_jax import cli  # noqa: E402
from asymflow_jax import experiment  # noqa: E402
from asymflow_jax import objective  # noqa: E402
from asymflow_jax import sampling  # noqa: E402
from asymflow_jax import sharding as shd  # noqa: E402
from asymflow_jax.models import backbone  # noqa: E402


def devices(topo: Topology, num_slices: int = 1) -> list:
  """Compile-only devices of the topology (TPU: through libtpu; cpu-N: this process's CPU devices)."""
  if topo.platform == "cpu":
    devs = jax.devices("cpu")
    if len(devs) != topo.chips * num_slices:
      raise ValueError(f"--topology={topo.name}: this process has {len(devs)} CPU devices; run it as "
                       f"`python -m asymflow_jax.aot` (which sets --xla_force_host_platform_device_count).")
    return devs
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology={topo.name} compiles with the TPU compiler of the libtpu wheel, which is not "
                     "installed: `pip install .[tpu-aot]` (or use --topology=cpu-N).")
  # libtpu takes a host-wide lock meant for real chips; compile-only use needs none, and without this
  # two compiles (or a compile and the optional test) on one host would refuse each other
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip_config,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=num_slices, wrap=topo.wrap)
  if len(desc.devices) != topo.chips * num_slices:
    raise ValueError(f"libtpu gave {len(desc.devices)} devices for {topo.name} x {num_slices} slice(s); expected "
                     f"{topo.chips * num_slices} (one per chip).")
  return list(desc.devices)


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  names = ("argument", "output", "alias", "temp", "generated_code")
  out = {n: int(getattr(mem, f"{n}_size_in_bytes")) for n in names}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def xla_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable from XLA's cost analysis (dict or list-of-dict forms).

  For a train step this is the whole step: forward, backward and optimizer update. Loops are
  counted once per body by XLA, so do not use it for ``fori_loop`` samplers.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def model_flops_per_chip(exp: experiment.Experiment, num_chips: int) -> float | None:
  """Model FLOPs of one train step per chip (3x the forward: forward + backward, no recomputation);
  None where no analytic count exists (text-to-image models)."""
  if backbone.is_text(exp.model):
    return None
  return 3.0 * exp.model.config.forward_flops(exp.config.batch_size) / num_chips


def placeholder_paths(config):
  """``config`` with placeholders for the files it names but compiling never reads (the data, a
  finetuning base, a DINOv2 REPA encoder): abstract steps need none of them."""
  with config.unlocked():
    config.data.path = config.data.path or "unused-by-aot"
    if config.finetune.trainable or config.finetune.lora_rank:
      config.finetune.base = config.finetune.base or "unused-by-aot"
    if config.repa.weight and config.repa.encoder.startswith("dinov2"):
      config.repa.encoder_path = config.repa.encoder_path or "unused-by-aot"   # the encoder stays abstract
  return config


def compile_train_step(config, devs) -> tuple[experiment.Experiment, dict]:
  t = time.time()
  exp = experiment.build(placeholder_paths(config), shd.make_mesh(config.mesh, devs), training=True)
  lowered = objective.lower_train_step(exp)
  lower_s = time.time() - t
  t = time.time()
  compiled = lowered.compile()
  return exp, dict(memory=_memory(compiled), flops=xla_flops(compiled), lower_s=lower_s, compile_s=time.time() - t)


def compile_sampler(config, devs, batch: int) -> dict:
  """One compiled call of the class-conditional sampling loop (``config.sample``) for ``batch`` images."""
  exp = experiment.build(placeholder_paths(config), shd.make_mesh(config.mesh, devs), training=False)
  if backbone.is_text(exp.model):
    raise ValueError("--sampler: only class-conditional (JiT) configs; text-to-image sampling is not covered yet.")
  s, target, repl = config.sample, exp.target(), shd.replicated(exp.mesh)
  batch += (-batch) % shd.batch_divisor(exp.mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)
  t = time.time()
  lowered = sampling.generate.lower(
      exp.model, target.params, target.basis, target.scale,
      jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl),
      jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding(exp.mesh, 1)), scalar, (scalar, scalar),
      num_steps=s.num_steps, method=s.method, sigma_min=s.sigma_min, cfg=s.guidance != 1.0,
      color_space=config.model.color_space)
  lower_s = time.time() - t
  t = time.time()
  compiled = lowered.compile()
  return dict(batch=batch, memory=_memory(compiled), lower_s=lower_s, compile_s=time.time() - t)


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _seconds(t: float) -> str:
  return f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def advice(memory: dict, hbm: int, config) -> str:
  """Why it does not fit: the biggest terms, and what would shrink them."""
  terms = sorted(((memory[k], k) for k in ("argument", "temp", "output", "generated_code")), reverse=True)
  lines = [f"the step needs {_gib(memory['peak'])} per chip but the chip has {_gib(hbm)}; biggest terms: "
           + ", ".join(f"{k} {_gib(v)}" for v, k in terms[:2]) + "."]
  if memory["temp"] >= memory["argument"]:
    lines.append("Temporaries (activations) dominate: " + ("" if config.model.get("remat", False) else
                 "turn remat on (--config.model.remat=True), or ") + "lower the per-chip batch (--config.batch_size).")
  else:
    lines.append("Arguments (parameters, optimizer state, EMA) dominate: shard them over more chips "
                 "(a larger fsdp axis in --config.mesh), or keep fewer EMA trees (--config.ema_decays).")
  return " ".join(lines)


def report(fields: dict) -> str:
  """The readable table of one result."""
  m, hbm = fields["bytes_per_chip"], fields.get("hbm_bytes")
  rows = [("topology", f"{fields['topology']} x {fields['num_slices']} slice(s): {fields['chips']} chips, mesh "
                       + " x ".join(f"{k}={v}" for k, v in fields["mesh"].items())),
          ("batch", f"{fields['batch_size']} ({fields['per_chip_batch']} per chip), remat {fields['remat']}")]
  for k in ("argument", "output", "alias", "temp", "generated_code", "peak"):
    rows.append((f"{k} / chip", _gib(m[k]) + (f"  ({m[k] / hbm:.0%} of {_gib(hbm)} HBM)" if hbm and k == "peak" else "")))
  if hbm:
    rows.append(("fits", "yes" if fields["fits"] else "NO"))
  rows.append(("FLOPs / chip / step", f"{fields['flops_per_chip']:.4g}"))
  if fields.get("step_time_lower_bound_s") is not None:
    rows.append(("step time lower bound", f"{_seconds(fields['step_time_lower_bound_s'])} at "
                                          f"{fields['peak_tflops']:.0f} TFLOP/s bf16"))
  if fields.get("model_flops_per_chip") is not None:
    rows.append(("model FLOPs / chip", f"{fields['model_flops_per_chip']:.4g} (3 x the analytic forward)"))
    rows.append(("MFU ceiling", "n/a (XLA counts fewer FLOPs than the model's)" if fields["mfu_ceiling"] is None
                 else f"{fields['mfu_ceiling']:.0%} (model FLOPs / compiled FLOPs)"))
  rows.append(("lower / compile", f"{fields['lower_s']:.1f} s / {fields['compile_s']:.1f} s"))
  if "sampler" in fields:
    sm = fields["sampler"]
    rows.append(("sampler", f"batch {sm['batch']}: peak {_gib(sm['memory']['peak'])} / chip, compile "
                            f"{sm['compile_s']:.1f} s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.aot", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:recipe]")
  parser.add_argument("--topology", required=True, help="v4-N, v5p-N, v5e-N, v6e-N or cpu-N")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--sampler", action="store_true", help="also compile the sampling loop (config.sample)")
  parser.add_argument("--sampler_batch", type=int, default=0, help="images per sampler call (default: batch_size)")
  parser.add_argument("--out", default=None, help="also write the JSON line here")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for a in rest:
    if not a.startswith("--config.") or "=" not in a:
      parser.error(f"unrecognized argument {a!r}; config overrides are --config.a.b=value")
    overrides.append(a[len("--config."):])
  if args.num_slices < 1:
    parser.error(f"--num_slices={args.num_slices}: expected at least 1.")
  try:
    topo = parse_topology(args.topology)
    config = cli.load_config(args.config, overrides)
    devs = devices(topo, args.num_slices)
    exp, res = compile_train_step(config, devs)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = len(devs)
  mem = res["memory"]
  fields = dict(config=args.config, overrides=overrides, topology=topo.name, num_slices=args.num_slices, chips=n,
                mesh=dict(zip(shd.MESH_AXES, exp.mesh.devices.shape)), batch_size=config.batch_size,
                per_chip_batch=config.batch_size / shd.batch_divisor(exp.mesh),
                remat=str(config.model.get("remat", False)), dtype=config.model.get("dtype", "float32"),
                bytes_per_chip=mem, flops_per_chip=res["flops"], lower_s=round(res["lower_s"], 2),
                compile_s=round(res["compile_s"], 2))
  model_flops = model_flops_per_chip(exp, n)
  if model_flops is not None:
    fields["model_flops_per_chip"] = model_flops
    # XLA:TPU's cost analysis can count fewer FLOPs than the model's matmuls need; the ceiling is
    # only meaningful where it counts at least those
    fields["mfu_ceiling"] = model_flops / res["flops"] if res["flops"] >= model_flops else None
  if topo.hbm_bytes:
    work = max(res["flops"], model_flops or 0.0)   # the step executes at least the model's FLOPs
    fields.update(hbm_bytes=topo.hbm_bytes, fits=mem["peak"] <= topo.hbm_bytes, peak_tflops=topo.peak_flops / 1e12,
                  step_time_lower_bound_s=work / topo.peak_flops)
  if args.sampler:
    try:
      fields["sampler"] = compile_sampler(config, devs, args.sampler_batch or config.batch_size)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  print(report(fields))
  line = json.dumps(fields, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  print(line)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  if fields.get("fits") is False:
    print(f"error: does not fit: {advice(mem, topo.hbm_bytes, config)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
