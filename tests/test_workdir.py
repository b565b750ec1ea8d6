"""One workdir format: a converted checkpoint is sampled, scored and finetuned by the project's own
CLIs; inference restores only the chosen weights; remote (epath) workdirs."""

import json
import os
import re

import numpy as np
import pytest

import jax
import orbax.checkpoint as ocp

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import convert
from asymflow_jax import evaluate
from asymflow_jax import experiment
from asymflow_jax import image_io
from asymflow_jax import sample
from asymflow_jax import sharding as shd
from asymflow_jax import trainer
from asymflow_jax.metric_log import MetricWriter, read_metrics
from tests.conftest import FIXTURES, REPO

TINY = str(REPO / "configs" / "asymjit_tiny.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The reference parity fixture (official AsymJiT weights layout) converted into a workdir."""
  from safetensors.numpy import save_file
  root = tmp_path_factory.mktemp("converted")
  with np.load(FIXTURES / "jit_tiny.npz") as f:
    sd = {k[3:]: f[k] for k in f.files if k.startswith("sd/")}
  save_file(sd, str(root / "ckpt.safetensors"))
  wd = root / "wd"
  assert convert.main(["--from", "pytorch", "--checkpoint", str(root / "ckpt.safetensors"), "--config", TINY,
                       "--workdir", str(wd)]) == 0
  return wd


def _record_restored_items(monkeypatch):
  seen = []
  original = ocp.CheckpointManager.restore

  def restore(self, step, args=None, **kw):
    seen.append(sorted(args.keys()) if args is not None else None)
    return original(self, step, args=args, **kw)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  return seen


def test_converted_workdir_is_sampled_and_scored_by_the_clis(converted, tmp_path, capsys, monkeypatch,
                                                              digit_classifier):
  seen = _record_restored_items(monkeypatch)
  out = tmp_path / "s"
  assert sample.main(["--workdir", str(converted), "--num", "10", "--steps", "2", "--out", str(out)]) == 0
  assert seen == [["checks", "params", "subspace"]]   # weights and subspace only
  with np.load(str(out) + ".npz") as f:
    assert f["images"].shape == (10, 32, 32, 3) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], np.arange(10))
  capsys.readouterr()
  assert evaluate.main(["--workdir", str(converted), "--metric", "fdd", "--num", "10", "--steps", "2",
                        "--classifier", str(digit_classifier), "--out", str(tmp_path / "r.json")]) == 0
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["metric"] == "fdd" and result["num_images"] == 10 and np.isfinite(result["fdd"]) and result["fdd"] > 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_train_finetunes_a_converted_workdir(converted, tmp_path):
  import shutil
  wd = tmp_path / "wd"
  shutil.copytree(converted, wd)
  _, _, start = checkpoint.open_workdir(str(wd))
  config = cli.load_config(TINY, ["num_steps=2", "batch_size=8", "checkpoint.every=2", "sample.num_images=0",
                                  "log_every=1"])   # no end-of-run grid: the other tests here sample this workdir
  result = trainer.train(config, str(wd), progress=False)
  assert result.status == trainer.COMPLETED and int(result.state.step) == 2
  assert sorted(os.listdir(wd / "checkpoints")) == ["0", "2"]
  # it started from the converted weights: the basis is the converted one, and 2 small AdamW steps
  # (lr 1e-4 during warm-up) moved every parameter by far less than its scale
  np.testing.assert_array_equal(np.asarray(result.state.basis), np.asarray(start.basis))
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(start.params)):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 2 * 2 * config.lr + 1e-7
  assert {"ema_0", "opt_state", "train_meta", "data"} <= set(os.listdir(wd / "checkpoints" / "2"))
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  # weights that a step lacks are refused, naming the ones it has (only "ema_0" falls back to "params",
  # where a converted step has no EMA); 0.99 is the tiny config's one EMA tree
  assert config.ema_decays == (0.99,)
  with pytest.raises(ValueError, match=re.escape("step 2 has no 'ema_1' weights; it has ['ema_0', 'params'].")):
    checkpoint.open_workdir(str(wd), weights="ema_1")
  with pytest.raises(ValueError, match=re.escape("step 0 has no 'ema_1' weights; it has ['params'].")):
    checkpoint.open_workdir(str(wd), step=0, weights="ema_1")
  assert int(checkpoint.open_workdir(str(wd), step=0)[2].step) == 0    # "ema_0" -> the converted "params"


def test_h16_inference_state_holds_no_optimizer_leaves():
  config = cli.load_config(str(REPO / "configs" / "imagenet256_h16.py"))
  mesh = shd.make_mesh(config.mesh, jax.devices()[:1])
  train_exp = experiment.build(config, mesh, training=True)
  infer_exp = experiment.build(config, mesh, training=False)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  assert isinstance(infer_exp.abstract, experiment.InferenceState)
  assert set(infer_exp.abstract.__dataclass_fields__) == {"step", "params", "basis", "scale"}
  n_params = 952_514_368
  assert sum(x.size for x in jax.tree.leaves(infer_exp.abstract.params)) == n_params
  # restore target ~3.8 GB (float32 params) against ~15.2 GB for the train state (params, 2 Adam moments, 1 EMA)
  assert nbytes(infer_exp.target()) == 4 * n_params + 4 * 768 * 8 + 4 + 4   # + basis (D = 768, r = 8), step, scale
  assert nbytes(train_exp.abstract) >= 4 * 4 * n_params
  assert nbytes(train_exp.abstract) / nbytes(infer_exp.abstract) > 3.9


# ------------------------------------------------------------------------------ remote workdirs


@pytest.fixture
def memory_gcs(monkeypatch):
  """gs:// paths served by an in-memory fsspec filesystem through etils.epath's own fsspec backend
  (a non-local backend, no network)."""
  import fsspec.implementations.memory
  from etils.epath import backend
  fs = fsspec.implementations.memory.MemoryFileSystem()
  fs.store.clear()
  fs.pseudo_dirs.clear()
  fs.pseudo_dirs.append("")
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: fs)  # pylint: disable=protected-access
  return fs


def test_config_metrics_tensorboard_and_images_go_through_epath(memory_gcs):
  from etils import epath
  wd = "gs://bucket/run"
  config = cli.load_config(str(REPO / "tests" / "train_config.py"))
  checkpoint.write_config(wd, config)
  as_json = lambda c: json.loads(c.to_json_best_effort())
  assert as_json(checkpoint.read_config(wd)) == as_json(config)
  assert checkpoint.read_config(wd).sample.interval == config.sample.interval == (0.0, 1.0)   # tuples stay tuples
  assert checkpoint.check_resume_config(wd, config) == []
  writer = MetricWriter(wd)
  for step in (1, 2, 3):
    writer.write(step, dict(loss=float(step)))
  writer.close()
  # a resume from step 2 drops step 3 (written after the last checkpoint) from the remote file
  MetricWriter(wd, resume_step=2, tensorboard=False).close()
  assert [r["step"] for r in read_metrics(wd)] == [1, 2]
  events = list((epath.Path(wd) / "tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().length > 0
  images = np.zeros((4, 8, 8, 1), np.uint8)
  image_io.save_png(f"{wd}/samples/grid.png", images)
  image_io.save_npz(f"{wd}/samples/s.npz", images=images)
  assert (epath.Path(wd) / "samples" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with (epath.Path(wd) / "samples" / "s.npz").open("rb") as f:
    np.testing.assert_array_equal(np.load(f)["images"], images)
  assert not os.path.exists("gs:") and not os.path.exists("bucket")   # nothing went to the local disk
  assert str(checkpoint.checkpoint_dir(wd)) == "gs://bucket/run/checkpoints"


def test_retention_keeps_the_newest_and_every_keep_every_th(tmp_path):
  from asymflow_jax import subspace as subspace_lib
  import jax.numpy as jnp
  from tests.train_config import tiny_train_config
  config = tiny_train_config()
  config.checkpoint.keep, config.checkpoint.keep_every, config.checkpoint.async_save = 2, 4, False
  exp = experiment.build(config, shd.make_mesh(config.mesh), training=True)
  state = exp.init_state(subspace_lib.random_subspace(16, 4, seed=0, patch_size=4))
  mngr = checkpoint.manager(str(tmp_path), config)
  try:
    for step in range(1, 11):
      checkpoint.save_train(mngr, state.replace(step=jnp.asarray(step, jnp.int32)), {}, force=True)
  finally:
    mngr.close()
  # the 2 newest plus every 4th
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "8", "9", "10"]
