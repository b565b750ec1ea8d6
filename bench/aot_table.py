"""Compiles every pod recipe for its TPU topology (python -m asymflow_jax.aot) and writes the table of
launch/README.md ("Ahead-of-time compilation for TPU").

    python bench/aot_table.py [--out bench/results/aot] [--only h16]     # needs `pip install .[tpu-aot]`
    python bench/aot_table.py --table_only                              # the table from the saved results

One subprocess per (config, recipe); each result is saved as JSON under --out and reused on the
next call (delete it to recompile). A run that fails (does not fit, or the compiler refuses)
is a row too, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGENET_RECIPES = ("v4-32", "v5e-64", "v5p-32", "v5p-64", "v6e-64")   # configs/common.py MESH_RECIPES (TPU ones)
RUNS = [(f"configs/imagenet256_{m}.py:{r}", r) for m in ("b16", "l16", "h16", "h16_repa") for r in IMAGENET_RECIPES]
RUNS += [("configs/asymflux2_klein.py:v5p-128", "v5p-128"),
         ("configs/asymflux2_klein.py:v5p-64", "v5p-64"),   # LPIPS in 8 slices
         ("configs/asymflux2_klein.py", "v5p-64")]   # the default mesh there: LPIPS all at once does not fit


def _name(config: str, topology: str) -> str:
  return config.replace("configs/", "").split(".py")[0].replace("/", "_") + "_" + topology


def run(config: str, topology: str, out: str, python: str) -> dict:
  path = os.path.join(out, _name(config, topology) + ".json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  proc = subprocess.run([python, "-m", "asymflow_jax.aot", f"--config={config}", f"--topology={topology}",
                         f"--out={path}.tmp"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if os.path.exists(path + ".tmp"):
    with open(path + ".tmp") as f:
      result = json.load(f)
    os.remove(path + ".tmp")
  else:
    result = dict(config=config, topology=topology)
  if proc.returncode != 0:
    result["error"] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")][-1:] or proc.stderr[-500:]
  with open(path, "w") as f:
    json.dump(result, f)
  return result


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f}"


def _tflop(x) -> str:
  return "n/a" if x is None else f"{x / 1e12:.2f}"


def table(results: list[dict]) -> str:
  head = ("| config:recipe | chips | mesh (data x fsdp x tensor) | batch / chip | remat | arguments | temporaries | "
          "code | peak GiB / chip | HBM | fits | TFLOP / chip / step (XLA) | model TFLOP / chip | step ≥ | MFU ceiling | "
          "compile s |")
  lines = [head, "|---" * 16 + "|"]
  for r in results:
    cfg = r["config"].replace("configs/", "").replace(".py", "")
    cfg += "" if ":" in r["config"] else f" (default mesh) on {r['topology']}"
    if "bytes_per_chip" not in r:
      lines.append(f"| `{cfg}` | | | | | | | | | | compile failed: {' '.join(r.get('error', []))} | | | | | |")
      continue
    m = r["bytes_per_chip"]
    mesh = " x ".join(str(v) for v in r["mesh"].values())
    fits = "yes" if r.get("fits") else "**no**"
    xla, model = r["flops_per_chip"], r.get("model_flops_per_chip")
    ceiling = f"{model / xla:.0%}" if model and xla >= model else "n/a"
    bound = max(xla, model or 0.0) / (r["peak_tflops"] * 1e12)   # as the tool computes it
    lines.append(f"| `{cfg}` | {r['chips']} | {mesh} | {r['per_chip_batch']:g} | {r['remat']} | {_gib(m['argument'])} | "
                 f"{_gib(m['temp'])} | {_gib(m['generated_code'])} | **{_gib(m['peak'])}** | {r['hbm_bytes'] / 2 ** 30:.0f} | "
                 f"{fits} | {r['flops_per_chip'] / 1e12:.2f} | {_tflop(r.get('model_flops_per_chip'))} | "
                 f"{bound * 1e3:.0f} ms | {ceiling} | "
                 f"{r['compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "aot"))
  p.add_argument("--only", default="", help="substring of the config:recipe names to compile")
  p.add_argument("--table_only", action="store_true")
  p.add_argument("--python", default=sys.executable)
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for config, topology in RUNS:
    path = os.path.join(args.out, _name(config, topology) + ".json")
    if args.table_only or args.only not in config:
      if os.path.exists(path):
        with open(path) as f:
          results.append(json.load(f))
      continue
    results.append(run(config, topology, args.out, args.python))
    print(json.dumps({k: results[-1].get(k) for k in ("config", "fits", "compile_s", "error")}), flush=True)
  text = table(results)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
