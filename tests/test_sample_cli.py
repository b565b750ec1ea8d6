"""The sample CLI on a tiny trained workdir: PNG + npz, and images independent of the batch size."""

import numpy as np

from asymflow_jax import sample


def test_sample_cli_writes_grid_and_is_batch_independent(tiny_run, tmp_path):
  workdir = str(tiny_run["workdir"])   # read only: the CLI writes to --out
  assert (tiny_run["workdir"] / "samples" / "step_0000004.png").exists()   # the end-of-training grid
  args = ["--workdir", workdir, "--num", "10", "--steps", "3", "--guidance", "1.5"]
  assert sample.main(args + ["--batch", "10", "--out", str(tmp_path / "a")]) == 0
  assert sample.main(args + ["--batch", "4", "--out", str(tmp_path / "b")]) == 0
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert a["images"].shape == (10, 32, 32, 1) and a["images"].dtype == np.uint8
  np.testing.assert_array_equal(a["labels"], np.arange(10))
  np.testing.assert_array_equal(a["images"], b["images"])
  assert (tmp_path / "a.png").stat().st_size > 0
