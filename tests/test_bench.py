"""Each bench script runs once with the tiniest settings and prints one parseable JSON line.

No timing thresholds here: the numbers only have to be present and positive.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY_MODEL = ["--set", "model.hidden_size=32", "--set", "model.depth=1", "--set", "model.num_heads=2",
              "--set", "model.in_context_len=2", "--set", "batch_size=4"]

CASES = {
    "train_step": (["bench/train_step.py", "--config=configs/default.py", "--steps=1", "--warmup=1",
                    "--peak_tflops=1", *TINY_MODEL], ["img_per_s", "flops_per_step_xla", "flops_per_step_analytic",
                                                      "mfu", "peak_tflops"]),
    "asymflow_overhead": (["bench/asymflow_overhead.py", "--config=configs/default.py", "--rank=4", "--pairs=2",
                           "--warmup=1", *TINY_MODEL], ["ratio_median", "ratio_of_medians"]),
    "sampler": (["bench/sampler.py", "--config=configs/default.py", "--num=2", "--steps=2", "--reps=1",
                 "--interval=0,0.88", *TINY_MODEL], ["img_per_s", "forward_img_per_s", "flops_analytic",
                                                     "interval_speedup"]),
    "data_pipeline": (["bench/data_pipeline.py", "--batch_size=8", "--batches=2"], ["img_per_s", "img_per_s_per_core"]),
    "data_pipeline_ar": (["bench/data_pipeline.py", "--source=array_record", "--num_records=8", "--batch_size=4",
                          "--batches=1", "--num_threads=1"], ["img_per_s", "img_per_s_per_core", "record_kb"]),
    "subspace_pca": (["bench/subspace_pca.py", "--image_size=32", "--channels=1", "--patch_size=4", "--batch=2",
                      "--batches=2", "--reps=1"], ["img_per_s", "tokens_per_s", "gflops_per_s"]),
    "memory": (["bench/memory.py", "--config=configs/default.py", "--devices=2", "--set", "mesh.fsdp=2",
                *TINY_MODEL], ["params_trained", "per_device_batch", "lower_s", "compile_s"]),
    "layer_scan": (["bench/layer_scan.py", "--reps=1", "--rounds=1", "--warmup=1", "--set", "model.hidden_size=32",
                    "--set", "model.num_heads=2", "--set", "model.in_context_len=2", "--set", "batch_size=2"],
                   ["compile_ratio", "step_time_ratio"]),   # the reference config's depth 6: blocks 1-3 and 4-5 scanned
    "profile_step": (["bench/profile_step.py", "--steps=1", "--warmup=1", "--top=3", *TINY_MODEL],
                     ["wall_step_ms", "instruction_ms_per_step", "instructions_seen"]),
    "reference_config": (["bench/reference_config.py", "--reps=1", "--warmup=1", "--train_batch=2",
                          "--forward_batch=2", "--steps_per_call=2", *TINY_MODEL[:-2]],
                         ["train_step_ms", "forward_ms", "train_fraction_of_peak"]),
}


# bench/memory.py sets the fake device count before importing jax: it needs a process of its own.
OWN_PROCESS = ("memory",)

_DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
out, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
for name, argv in cases.items():
  buf, rc, err = io.StringIO(), 0, ""
  sys.argv = list(argv)
  try:
    with contextlib.redirect_stdout(buf):
      runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:
    rc, err = 1, traceback.format_exc()
  with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(dict(rc=rc, stdout=buf.getvalue(), stderr=err), f)
"""


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
  """{case: (returncode, stdout, stderr)}: the scripts run one after another in ONE fresh Python
  process (runpy, as ``python bench/X.py`` would), which saves an interpreter + jax start-up per script;
  the scripts in OWN_PROCESS run as their own subprocess."""
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  shared = {n: argv for n, (argv, _) in CASES.items() if n not in OWN_PROCESS}
  proc = subprocess.run([sys.executable, "-c", _DRIVER, str(out), json.dumps(shared)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  runs = {}
  for name in shared:
    path = out / f"{name}.json"
    if path.exists():
      r = json.loads(path.read_text())
      runs[name] = (r["rc"], r["stdout"], r["stderr"] or proc.stderr[-3000:])
    else:
      runs[name] = (proc.returncode or 1, "", proc.stderr[-3000:])
  for name in OWN_PROCESS:
    p = subprocess.run([sys.executable, *CASES[name][0]], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    runs[name] = (p.returncode, p.stdout, p.stderr[-3000:])
  return runs


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_prints_one_json_line(name, bench_runs):
  _, keys = CASES[name]
  rc, stdout, stderr = bench_runs[name]
  assert rc == 0, stderr
  lines = [l for l in stdout.splitlines() if l.strip()]
  assert len(lines) == 1, stdout
  rec = json.loads(lines[0])
  assert rec["bench"] == name.removesuffix("_ar")
  for key in ("platform", "device_kind", "jax", "cpu_cores", "command"):
    assert rec[key], key
  for key in keys:
    assert isinstance(rec[key], (int, float)) and rec[key] > 0, (key, rec[key])
  if name == "profile_step":   # every phase of the step is found by its named scope, and the shares add up
    ms = rec["phase_ms_per_step"]
    assert all(ms[p] > 0 for p in ("forward", "backward", "optimizer", "nonfinite")), ms
    assert abs(sum(rec["phase_share"].values()) - 1) < 1e-6 and len(rec["top"]) == 3
    assert {t["phase"] for t in rec["top"]} <= set(ms) and all(t["ms_per_step"] > 0 for t in rec["top"])
  if name == "memory":   # 2 fake devices, FSDP over both: the batch of 4 splits in 2, the arguments are counted
    assert rec["num_devices"] == 2 and rec["per_device_batch"] == 2 and rec["mesh"]["fsdp"] == 2
    per = rec["bytes_per_device"]
    assert per["argument"] > 0 and per["peak"] == per["argument"] + per["output"] - per["alias"] + per["temp"]
  if name == "reference_config":   # the kernel-side cost per step beside XLA's temporary buffer size
    os_cost = rec["train_step_os"]
    assert os_cost["xla_temp_mib"] > 0 and os_cost["user_ms_per_call"] > 0
    assert os_cost["sys_ms_per_call"] >= 0 and os_cost["minor_faults_per_call"] >= 0
    multi = rec["train_steps_per_call"]   # 2 steps per call, timed and costed per step
    assert multi["steps_per_call"] == 2 and multi["step_ms"] > 0 and multi["os_per_step"]["user_ms_per_call"] > 0
    assert multi["fraction_of_peak"] == pytest.approx(
        rec["train_flops_per_step_xla"] / (multi["step_ms"] / 1e3) / (rec["peak_tflops"] * 1e12), rel=1e-6)
