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
                 *TINY_MODEL], ["img_per_s", "forward_img_per_s", "flops_analytic"]),
    "data_pipeline": (["bench/data_pipeline.py", "--batch_size=8", "--batches=2"], ["img_per_s", "img_per_s_per_core"]),
    "data_pipeline_ar": (["bench/data_pipeline.py", "--source=array_record", "--num_records=8", "--batch_size=4",
                          "--batches=1", "--num_threads=1"], ["img_per_s", "img_per_s_per_core", "record_kb"]),
    "subspace_pca": (["bench/subspace_pca.py", "--image_size=32", "--channels=1", "--patch_size=4", "--batch=2",
                      "--batches=2", "--reps=1"], ["img_per_s", "tokens_per_s", "gflops_per_s"]),
    "memory": (["bench/memory.py", "--config=configs/default.py", "--devices=2", "--set", "mesh.fsdp=2",
                *TINY_MODEL], ["params_trained", "per_device_batch", "lower_s", "compile_s"]),
    "reference_config": (["bench/reference_config.py", "--reps=1", "--warmup=1", "--train_batch=2",
                          "--forward_batch=2", *TINY_MODEL[:-2]], ["train_step_ms", "forward_ms", "train_fraction_of_peak"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_prints_one_json_line(name):
  argv, keys = CASES[name]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  rec = json.loads(lines[0])
  assert rec["bench"] == name.removesuffix("_ar")
  for key in ("platform", "device_kind", "jax", "cpu_cores", "command"):
    assert rec[key], key
  for key in keys:
    assert isinstance(rec[key], (int, float)) and rec[key] > 0, (key, rec[key])
  if name == "memory":   # 2 fake devices, FSDP over both: the batch of 4 splits in 2, the arguments are counted
    assert rec["num_devices"] == 2 and rec["per_device_batch"] == 2 and rec["mesh"]["fsdp"] == 2
    per = rec["bytes_per_device"]
    assert per["argument"] > 0 and per["peak"] == per["argument"] + per["output"] - per["alias"] + per["temp"]
