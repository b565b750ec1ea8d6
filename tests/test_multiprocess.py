"""Multi-process training on 127.0.0.1 (2 JAX processes x 2 CPU devices) and the launchers.

The 2-process runs go through ``launch/local_multiprocess.py`` with ``tests/multiprocess_worker.py``.
Each process reads its own strided shard of the data (grain per-process sharding), so the global
batch of a 2-process run is NOT the batch of a plain 1-process run; the single-process reference
(in the pytest process) therefore reads the concatenation of the two per-process pipelines
(``multiprocess_worker.emulated_make_pipeline``), which is exactly the global batch the 2
processes assemble. One 2-process job serves all tests: killed after its step-2 checkpoint, then
resumed to step 4 by a second launch.
"""

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from PIL import Image

import jax

from asymflow_jax import distributed
from asymflow_jax import image_io
from asymflow_jax import sample
from asymflow_jax import trainer
from asymflow_jax.data import pipeline
from tests import multiprocess_worker
from tests.conftest import FAST_XLA_FLAGS, build_once, flat_params
from tests.train_config import tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = "tests/multiprocess_worker.py"
MESH = "2,2,1"   # data=2 x fsdp=2 over 2 processes x 2 devices: parameters sharded across processes
TIMEOUT = 420


def _env(devices=None):
  # os.environ holds the test run's persistent compile cache (tests/conftest.py): the worker
  # subprocesses share it with each other and with the in-process runs of the tests
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = FAST_XLA_FLAGS   # the launcher appends each process's device count
  if devices:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  return env


def _launch_cmd(workdir, steps, out, *extra):
  return [sys.executable, "launch/local_multiprocess.py", "--num_processes=2", "--devices_per_process=2",
          f"--script={WORKER}", f"--timeout={TIMEOUT - 20}", "--", f"--workdir={workdir}", f"--steps={steps}",
          f"--out={out}", f"--mesh={MESH}", *extra]


def _two_processes(workdir, steps, out, *extra):
  proc = subprocess.run(_launch_cmd(workdir, steps, out, *extra), env=_env(), cwd=REPO, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  return proc.stdout


def _infos(stdout):
  return [json.loads(line.split("WORKER_INFO ", 1)[1]) for line in stdout.splitlines() if "WORKER_INFO " in line]


def _params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files if k.startswith("[")}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _kill_after_checkpoint(workdir, step):
  """Launches 2 processes to step 4 and SIGKILLs the launcher and both processes once checkpoint
  ``step`` is committed (each process then waits in the worker's hang). What the kill left behind."""
  proc = subprocess.Popen(_launch_cmd(workdir, 4, workdir.parent / "unused.npz", f"--hang_after_checkpoint={step}",
                                      "--no_samples"),
                          env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    deadline = time.time() + TIMEOUT
    while not all((workdir / f"hang_{i}").exists() for i in (0, 1)):
      assert proc.poll() is None, proc.stdout.read()[-4000:]
      assert time.time() < deadline, f"the step-{step} checkpoint never appeared"
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both training processes, mid-run
    proc.wait()
  for i in (0, 1):
    (workdir / f"hang_{i}").unlink()
  return dict(returncode=proc.returncode, checkpoints=sorted(os.listdir(workdir / "checkpoints")),
              logged_steps=[s for s, _ in _losses(workdir)])


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory):
  """The 2-process job of these tests (2 processes x 2 devices, mesh data=2 x fsdp=2, 4 steps,
  checkpoints at 2 and 4), computed once per test run (xdist-safe): SIGKILLed once checkpoint 2 is
  committed, then resumed by a fresh 2-process launch (new coordinator port) to step 4, which
  writes the end-of-training sample grid. ``killed`` is what the kill left behind."""
  def build(root):
    root.mkdir(parents=True)
    killed = _kill_after_checkpoint(root / "wd", 2)
    (root / "killed.json").write_text(json.dumps(killed))
    (root / "stdout").write_text(_two_processes(root / "wd", 4, root / "final.npz"))
  root = build_once(tmp_path_factory, "mp-killed-resumed", build)
  return dict(workdir=root / "wd", out=root / "final.npz", stdout=(root / "stdout").read_text(),
              killed=json.loads((root / "killed.json").read_text()))


def test_sigkill_after_checkpoint_then_resume(two_process_run):
  killed = two_process_run["killed"]
  assert killed == dict(returncode=-signal.SIGKILL, checkpoints=["2"], logged_steps=[1, 2])   # nothing after step 2
  assert "resumed from step 2" in two_process_run["stdout"]
  assert sorted(os.listdir(two_process_run["workdir"] / "checkpoints")) == ["2", "4"]
  assert [s for s, _ in _losses(two_process_run["workdir"])] == [1, 2, 3, 4]   # each step logged once


def test_two_processes_match_one_process_on_the_same_global_batch(two_process_run, tmp_path, monkeypatch):
  """The killed-and-resumed 2-process run equals, to float32 reduction-order tolerance, a plain run
  on this 1-device process that reads the same global batches (the 2 per-process pipelines
  concatenated, process 0's rows first). Any error in the restored data-iterator or noise state
  after the restart would change the losses of steps 3 and 4 by far more."""
  infos = sorted(_infos(two_process_run["stdout"]), key=lambda i: i["process_index"])
  assert [(i["process_index"], i["process_count"], i["device_count"], i["local_device_count"], i["step"])
          for i in infos] == [(0, 2, 4, 2, 4), (1, 2, 4, 2, 4)]
  assert infos[0]["device_processes"] == [0, 0, 1, 1]          # process 0's rows come first in the batch
  assert infos[0]["config_sha256"] == infos[1]["config_sha256"]
  monkeypatch.setattr(pipeline, "make_pipeline", multiprocess_worker.emulated_make_pipeline(pipeline.make_pipeline, 2))
  config = tiny_train_config(4)
  config.sample.num_images = 0
  single = trainer.train(config, str(tmp_path / "one"), progress=False).state
  assert jax.device_count() == 1
  multi, losses = _losses(two_process_run["workdir"]), _losses(tmp_path / "one")
  assert [s for s, _ in multi] == [s for s, _ in losses] == [1, 2, 3, 4]
  for (step, lm), (_, ls) in zip(multi, losses):
    assert abs(lm - ls) <= 1e-5 * abs(ls), (step, lm, ls)
  pm, ps = _params(two_process_run["out"]), flat_params(single.params)
  assert len(pm) == len(ps) > 10 and pm.keys() == ps.keys()
  for k in ps:
    np.testing.assert_allclose(pm[k], ps[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_process_checkpoint_restores_in_one_process(two_process_run, tmp_path):
  # in this pytest process: 1 process x 1 device
  assert jax.process_count() == 1 and jax.device_count() == 1
  workdir = tmp_path / "copy"
  shutil.copytree(two_process_run["workdir"], workdir)
  # num_steps = 4 = the latest checkpoint: train() only restores
  restored = trainer.train(tiny_train_config(4), str(workdir), progress=False)
  assert restored.status == trainer.COMPLETED and int(restored.state.step) == 4
  want, got = _params(two_process_run["out"]), flat_params(restored.state.params)
  assert want.keys() == got.keys() and len(want) > 10
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # the 2-process run's end-of-training grid (EMA, seed config.seed + 1 = 1, the config's sampler) is
  # reproduced pixel for pixel by sampling the same checkpoint in 1 process with the sample CLI:
  # images do not depend on the number of hosts
  num = tiny_train_config().sample.num_images
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000004.png"))
  assert sample.main([f"--workdir={workdir}", f"--num={num}", "--seed=1", f"--out={tmp_path / 'one'}"]) == 0
  one = np.load(tmp_path / "one.npz")["images"]
  assert one.shape == (num, 32, 32, 1)
  upscale = 4   # 128 // 32, as the trainer writes it
  np.testing.assert_array_equal(grid[::upscale, ::upscale], image_io.image_grid(one, cols=10)[..., 0])
  assert one.std() > 5
  # and training continues there to step 6
  six = trainer.train(tiny_train_config(6), str(workdir), progress=False)
  assert six.status == trainer.COMPLETED and int(six.state.step) == 6
  losses = _losses(workdir)
  assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for _, v in losses)
  assert losses[:4] == _losses(two_process_run["workdir"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  six = flat_params(six.state.params)
  assert any(not np.array_equal(six[k], want[k]) for k in want)


def test_config_disagreement_names_the_process(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, f"--workdir={tmp_path}", "--steps=4", "--check_only",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                             f"--lr={lr}"], env=_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i, lr in enumerate((1e-3, 2e-3))]
  outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode != 0, out[-2000:]
    assert "the experiment config differs across processes: processes [1] disagree with process 0" in out, out[-3000:]


def _free_port():
  sys.path.insert(0, str(REPO / "launch"))
  try:
    import local_multiprocess  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return local_multiprocess.free_port()


# ------------------------------------------------------------------------------ no processes


def test_initialize_stays_single_process_without_a_cluster(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "OMPI_MCA_orte_hnp_uri",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID",
              "ASYMFLOW_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detect_environment() == "single"
  assert distributed.initialize() is False and distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1", 1, 0) is False        # one process: nothing to start
  with pytest.raises(ValueError, match="pass all of coordinator_address, num_processes and process_id"):
    distributed.initialize("127.0.0.1:1", 2)
  with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, num_processes=2\)"):
    distributed.initialize("127.0.0.1:1", 2, 2)
  for var, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="2", SLURM_PROCID="0",
                         SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8").items():
    monkeypatch.setenv(var, value)
  assert distributed.detect_environment() == "slurm"
  assert distributed._slurm_local_device_ids() == list(range(8))   # one process owns all 8 GPUs of its node
  monkeypatch.setenv("ASYMFLOW_DISTRIBUTED", "0")
  assert distributed.detect_environment() == "single"
  assert distributed.is_primary()
  from tests.train_config import tiny_train_config  # pylint: disable=import-outside-toplevel
  a, b = tiny_train_config(), tiny_train_config()
  assert distributed.config_hash(a) == distributed.config_hash(b) == distributed.check_config_agreement(a)
  b.lr = 2e-3
  assert distributed.config_hash(a) != distributed.config_hash(b)
  assert distributed.config_hash(a, dict(workdir="w1")) != distributed.config_hash(a, dict(workdir="w2"))


# ----------------------------------------------------------------------------------- launchers


def _run(cmd, **env):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_sweep_dry_run_lists_the_cartesian_product():
  out = _run([sys.executable, "launch/sweep.py", "--config=configs/default.py", "--workdir=workdirs/sweep",
              "--sweep", "model.rank=0,4,8,D", "--sweep", "subspace.kind=pca,random", "--dry-run", "--",
              "--config.num_steps=100"])
  lines = [l for l in out.splitlines() if not l.startswith("#")]
  from configs import default  # noqa: PLC0415
  m = default.get_config().model
  d = m.patch_size ** 2 * m.in_channels
  assert f"# D = patch_size^2 * in_channels = {d}" in out and "# 8 runs" in out
  assert len(lines) == 8
  runs = [shlex.split(l) for l in lines]
  assert all(r[1:3] == ["-m", "asymflow_jax.train"] and "--config=configs/default.py" in r
             and r[-1] == "--config.num_steps=100" for r in runs)
  workdirs = [next(a.split("=", 1)[1] for a in r if a.startswith("--workdir=")) for r in runs]
  assert workdirs == [f"workdirs/sweep/rank{r}_kind-{k}" for r in (0, 4, 8, d) for k in ("pca", "random")]
  ranks = [next(a for a in r if a.startswith("--config.model.rank=")) for r in runs]
  assert ranks == [f"--config.model.rank={r}" for r in (0, 4, 8, d) for _ in range(2)]
  kinds = [next(a for a in r if a.startswith("--config.subspace.kind=")) for r in runs]
  assert kinds == [f"--config.subspace.kind={k}" for _ in range(4) for k in ("pca", "random")]
  # D follows the (overridden) patch size: 2 x 2 x 1 = 4, and 4 appears once
  out = _run([sys.executable, "launch/sweep.py", "--config=configs/default.py", "--workdir=w", "--sweep",
              "model.rank=2,4,D", "--launcher=local", "--num_processes=2", "--dry-run", "--",
              "--config.model.patch_size=2"])
  lines = [l for l in out.splitlines() if not l.startswith("#")]
  assert [shlex.split(l)[1] for l in lines] == ["launch/local_multiprocess.py"] * 2
  assert ["--workdir=w/rank2" in l and "--workdir=w/rank4" not in l for l in lines] == [True, False]
  assert all("--num_processes=2 --devices_per_process=1 -- --config=configs/default.py" in l for l in lines)


def test_local_multiprocess_dry_run():
  out = _run([sys.executable, "launch/local_multiprocess.py", "--num_processes=3", "--devices_per_process=2",
              "--port=12345", "--dry-run", "--", "--config=configs/default.py:runlocal", "--workdir=w"])
  lines = out.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    args = shlex.split(line)
    assert args[:2] == [f"XLA_FLAGS={FAST_XLA_FLAGS} --xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu"]
    assert args[3:] == ["-m", "asymflow_jax.train", "--config=configs/default.py:runlocal", "--workdir=w",
                        "--coordinator_address=127.0.0.1:12345", "--num_processes=3", f"--process_id={i}"]


def test_tpu_pod_dry_run_prints_complete_commands():
  out = _run(["bash", "launch/tpu_pod.sh", "--tpu", "asym-v5p-64", "--zone", "us-east5-a", "--project", "my-proj",
              "--config=configs/imagenet256_h16.py", "--workdir=/mnt/ckpt/asymflow/h16", "--repo",
              "https://github.com/me/asymflow_jax.git", "--config.model.rank=8", "--dry-run"])
  setup, train = [shlex.split(l) for l in out.strip().splitlines()]
  prefix = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "asym-v5p-64", "--zone=us-east5-a", "--project=my-proj",
            "--worker=all"]
  assert setup[:-1] == prefix and train[:-1] == prefix
  setup_cmd = setup[-1].removeprefix("--command=")
  for piece in ("git clone -q --branch main https://github.com/me/asymflow_jax.git ~/asymflow_jax",
                "pull -q --ff-only", "python3 -m venv .venv", ".venv/bin/pip install -q -r requirements.txt",
                '.venv/bin/pip install -q -U "jax[tpu]==0.10.2"'):
    assert piece in setup_cmd, (piece, setup_cmd)
  assert train[-1] == ("--command=cd ~/asymflow_jax && mkdir -p logs && .venv/bin/python -m asymflow_jax.train "
                       "--config=configs/imagenet256_h16.py --workdir=/mnt/ckpt/asymflow/h16 "
                       "--config.model.rank=8 2>&1 | tee -a logs/train.log")
  detached = _run(["bash", "launch/tpu_pod.sh", "--no-setup", "--detach", "--dry-run", "--config=configs/imagenet256_h16.py",
                   "--workdir=/mnt/ckpt"], TPU_NAME="t", ZONE="z")
  assert detached.count("\n") == 1 and "nohup .venv/bin/python -m asymflow_jax.train" in detached
  bad = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")})
  assert bad.returncode == 2 and "missing --tpu --zone --config --workdir" in bad.stderr and "usage:" in bad.stderr


def test_slurm_dry_run_prints_the_srun_command():
  want = ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/python -m asymflow_jax.train "
          "--config=configs/imagenet256_h16.py --workdir=/shared/h16 --config.model.rank=8")
  args = ["--config=configs/imagenet256_h16.py", "--workdir=/shared/h16", "--config.model.rank=8"]
  for out in (_run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", *args]),
              _run(["bash", "launch/slurm_gpu.sbatch", *args], DRY_RUN="1", SLURM_GPUS_ON_NODE="8")):
    env_line, cmd = out.strip().splitlines()
    assert cmd == want
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in env_line
  header = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
  for directive in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=",
                    "#SBATCH --signal=TERM@", "#SBATCH --requeue"):
    assert directive in header
