"""Fault injection on the real command lines (subprocesses, tiny config): errors and Ctrl-C inside
the loop, SIGTERM, bad configs, a changed config on resume, corrupt checkpoints, NaN results,
late-checked evaluation inputs, bad CLI arguments. Each test asserts the exact outcome: the
checkpoints on disk, the message, the exit code."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import checkpoint
from asymflow_jax import config as config_lib
from asymflow_jax import experiment
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from tests.conftest import build_once, subprocess_env
from tests.train_config import tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=tests/train_config.py:6"
FAST = ["--config.checkpoint.async_save=True", "--config.sample.num_steps=1", "--config.sample.num_images=2"]


def _run(args, timeout=600):
  return subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _train(workdir, *extra, fault="none", at=0):
  return _run(["tests/fault_worker.py", fault, str(at), "--", CONFIG, f"--workdir={workdir}", *FAST, *extra])


def _steps(workdir):
  return sorted(os.listdir(pathlib.Path(workdir) / "checkpoints"))


def _final_params(workdir):
  _, _, state = checkpoint.open_workdir(str(workdir), weights="params")
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
  """An uninterrupted 6-step run (checkpoints at 2, 4, 6), made once per test run by the training CLI
  (the xdist workers share it). Read only: tests that change it work on a copy."""
  def build(root):
    proc = _train(root / "wd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed at step 6" in proc.stderr
  return build_once(tmp_path_factory, "faults-straight-6", build) / "wd"


def test_error_in_the_loop_keeps_the_checkpoint_and_is_reported_once(tmp_path):
  proc = _train(tmp_path / "wd", fault="raise", at=3)   # right after the async save of step 2 started
  assert proc.returncode == 1
  err = proc.stderr
  assert err.count("RuntimeError: injected bad record at batch 3") == 1, err[-3000:]
  assert err.count("Traceback") == 1 and "Event loop is closed" not in err, err[-3000:]
  assert _steps(tmp_path / "wd") == ["2"]   # finished: no *.orbax-checkpoint-tmp left behind


def test_ctrl_c_keeps_the_checkpoint_and_exits_130(tmp_path):
  proc = _train(tmp_path / "wd", fault="interrupt", at=3)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert "interrupted: the last checkpoint save was completed" in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert _steps(tmp_path / "wd") == ["2"]


def test_sigterm_saves_exits_0_and_resumes_bitwise(request, tmp_path):
  wd = tmp_path / "wd"
  proc = _train(wd, fault="sigterm", at=3)   # SIGTERM arrives while step 3 is prepared
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "preempted: saved step 3" in proc.stderr and "preempted at step 3" in proc.stderr
  assert _steps(wd) == ["2", "3"]
  proc = _train(wd)
  assert proc.returncode == 0 and "resumed from step 3" in proc.stderr, proc.stderr[-3000:]
  assert _steps(wd) == ["3", "4", "6"]   # keep = 3 newest
  straight = request.getfixturevalue("straight")   # late: if another xdist worker makes it, meanwhile
  want, got = _final_params(straight), _final_params(wd)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # every logged step appears once, with the loss of the uninterrupted run
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  ref = {r["step"]: r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {r["step"]: r["loss"] for r in rows} == ref


def test_keep_zero_and_other_bad_values_fail_before_anything_is_touched(tmp_path, straight):
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  before = _steps(wd)
  proc = _run(["-m", "asymflow_jax.train", CONFIG, f"--workdir={wd}", "--config.checkpoint.keep=0",
               "--config.lr=-1.0", "--config.log_every=0"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  for needle in ("config.checkpoint.keep=0: expected an integer >= 1", "config.lr=-1.0: expected a finite number > 0",
                 "config.log_every=0: expected an integer >= 1"):
    assert needle in proc.stderr, proc.stderr[-2000:]
  assert _steps(wd) == before
  proc = _run(["-m", "asymflow_jax.train", CONFIG, f"--workdir={wd}", "--config.checkpoint.kepp=2"])
  assert proc.returncode != 0 and "kepp" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_unknown_key_in_a_config_names_close_matches():
  c = tiny_train_config()
  c.checkpoint.kepp = 2
  c.modle = c.model
  with pytest.raises(ValueError) as err:
    config_lib.validate_config(c, 1)
  msg = str(err.value)
  assert "config.checkpoint.kepp does not exist; did you mean checkpoint.keep?" in msg
  assert "config.modle does not exist; did you mean model?" in msg


def test_resume_with_a_changed_model_stops_and_keeps_the_stored_config(tmp_path, straight):
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  stored = (wd / "config.json").read_bytes()
  proc = _run(["-m", "asymflow_jax.train", CONFIG, f"--workdir={wd}", "--config.model.depth=3",
               "--config.model.rank=2"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "model.depth: 2 -> 3" in proc.stderr and "model.rank: 4 -> 2" in proc.stderr
  assert "does not match the one stored in" in proc.stderr
  assert (wd / "config.json").read_bytes() == stored
  # sampling still opens the workdir (the sample CLI's main, in this process)
  from asymflow_jax import sample
  assert sample.main([f"--workdir={wd}", "--num=2", "--steps=1", f"--out={tmp_path / 's'}"]) == 0
  with np.load(tmp_path / "s.npz") as f:
    assert f["images"].shape == (2, 32, 32, 1)


def _restore(wd, capsys):
  config = tiny_train_config(6)
  exp = experiment.build(config, shd.make_mesh(config.mesh), training=True)
  mngr = checkpoint.manager(str(wd), config)
  try:
    out = checkpoint.restore_train(str(wd), mngr, exp)
  finally:
    mngr.close()
  return out, capsys.readouterr().err


def _array_files(step_dir):
  return sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d")


def test_truncated_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, straight, capsys):
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  for f in _array_files(wd / "checkpoints" / "6"):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  (state, data), err = _restore(wd, capsys)
  assert int(state.step) == 4 and data["process_count"] == 1
  assert "WARNING: checkpoint step 6 could not be read" in err
  assert "resuming from step 4, the newest checkpoint that verifies; steps [6] were moved" in err
  assert _steps(wd) == ["2", "4"] and os.listdir(wd / "corrupt_checkpoints") == ["6"]


def test_silently_changed_data_fails_its_fingerprint(tmp_path, straight, capsys):
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  # valid orbax data with other values (what an undetected bit flip looks like): step 4's params in step 6
  shutil.rmtree(wd / "checkpoints" / "6" / "params")
  shutil.copytree(wd / "checkpoints" / "4" / "params", wd / "checkpoints" / "6" / "params")
  (state, _), err = _restore(wd, capsys)
  assert int(state.step) == 4
  assert "step 6: item 'params' does not match the fingerprint written with it" in err
  # the message names the first 5 differing leaves, then " ..." (the tiny model has more than 5)
  listed = re.search(r"corrupted data in (.*)\)\.", err).group(1)
  assert listed.endswith(" ...") and len(listed.removesuffix(" ...").split(", ")) == 5, listed


def test_missing_metadata_everywhere_stops_naming_every_step(tmp_path, straight, capsys):
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  for step in ("2", "4", "6"):
    shutil.rmtree(wd / "checkpoints" / step / "train_meta")
  with pytest.raises(checkpoint.CheckpointError) as err:
    _restore(wd, capsys)
  msg = str(err.value)
  assert all(f"step {s} has no item(s) ['train_meta']" in msg for s in (2, 4, 6)), msg
  assert _steps(wd) == ["2", "4", "6"] and not (wd / "corrupt_checkpoints").exists()   # nothing moved


def test_a_step_with_nan_values_is_refused_on_restore(tmp_path, straight, capsys):
  # save_train never writes a non-finite state; a step that holds one anyway (written by other means,
  # with a matching fingerprint) must still be refused on restore, and the run falls back
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  (state, data), _ = _restore(wd, capsys)
  nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), state.params)
  mngr = checkpoint.manager(str(wd), tiny_train_config(6))
  try:
    checkpoint._save_items(mngr, 8, checkpoint._items(state.replace(params=nan_params)), data, force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  (state, _), err = _restore(wd, capsys)
  assert int(state.step) == 6
  assert "step 8: item 'params' holds NaN or Inf values" in err
  assert os.listdir(wd / "corrupt_checkpoints") == ["8"]


def test_restore_lets_exit_and_ctrl_c_through(straight, monkeypatch, capsys):
  # only errors of the data become CheckpointError (and a fallback to an older step); an exit or a
  # Ctrl-C during the read ends the run as it would anywhere else
  for exc in (SystemExit(3), KeyboardInterrupt()):
    def fail(*_, exc=exc, **__):
      raise exc
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", fail)
    with pytest.raises(type(exc)):
      _restore(straight, capsys)
  assert _steps(straight) == ["2", "4", "6"] and not (straight / "corrupt_checkpoints").exists()


def test_quarantine_never_overwrites_an_earlier_copy(tmp_path):
  # step 6 was moved aside twice before, step 5 once, step 4 never
  for name in ("checkpoints/6", "checkpoints/5", "checkpoints/4", "corrupt_checkpoints/6", "corrupt_checkpoints/6.1",
               "corrupt_checkpoints/5"):
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "marker").write_text(name)
  checkpoint._quarantine(str(tmp_path), [6, 5, 4])
  assert sorted(os.listdir(tmp_path / "corrupt_checkpoints")) == ["4", "5", "5.1", "6", "6.1", "6.2"]
  for moved, src in (("6.2", "6"), ("5.1", "5"), ("4", "4")):
    assert (tmp_path / "corrupt_checkpoints" / moved / "marker").read_text() == f"checkpoints/{src}"
  assert (tmp_path / "corrupt_checkpoints" / "6.1" / "marker").read_text() == "corrupt_checkpoints/6.1"
  assert os.listdir(tmp_path / "checkpoints") == []


def test_config_json_is_written_into_a_new_nested_workdir(tmp_path):
  wd = tmp_path / "runs" / "new" / "wd"
  checkpoint.write_config(str(wd), tiny_train_config(2))
  assert checkpoint.read_config(str(wd)).model.rank == 4


def test_rank0_state_saves_and_restores(tmp_path):
  # a rank-0 basis (D, 0) is not stored (orbax cannot write zero-size arrays) and comes back as (D, 0)
  config = tiny_train_config(2)
  config.model.rank = 0
  exp = experiment.build(config, shd.make_mesh(config.mesh), training=True)
  d = exp.model.config.patch_dim
  state = exp.init_state(subspace_lib.Subspace(basis=np.zeros((d, 0), np.float32), patch_size=4))
  mngr = checkpoint.manager(str(tmp_path), config)
  try:
    checkpoint.save_train(mngr, state, {"pos": 3}, force=True)
    # the train loop decides when to save: the manager keeps any step it is given (here an odd one)
    checkpoint.save_train(mngr, state.replace(step=state.step + 1), {"pos": 5})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [0, 1]
    restored, data = checkpoint.restore_train(str(tmp_path), mngr, exp)
  finally:
    mngr.close()
  assert int(restored.step) == 1 and restored.basis.shape == (d, 0) and data == {"pos": 5}
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, b)


def test_flat_diff_lists_changed_leaves_and_a_subtree_replaced_by_a_value():
  stored = {"a": {"b": 1, "c": {"d": 2}}, "e": 3, "gone": 1}
  new = {"a": {"b": 1, "c": 5}, "e": 4, "added": {"x": 1}}
  assert checkpoint._flat_diff(stored, new) == [
      "a.c: {'d': 2} -> 5", "added: None -> {'x': 1}", "e: 3 -> 4", "gone: 1 -> None"]


def test_fingerprint_sees_every_single_bit_flip():
  x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
  base = checkpoint.fingerprints({"a": {"x": x}})[0]["a"]
  bits = x.view(np.uint32)
  for i in range(x.size):
    for b in (0, 13, 31):
      flipped = bits.copy().reshape(-1)
      flipped[i] ^= np.uint32(1 << b)
      assert checkpoint.fingerprints({"a": {"x": flipped.view(np.float32).reshape(x.shape)}})[0]["a"] != base
  # every element size has its bit view: 1-byte (uint8, bool), 2-byte (bfloat16) and, with x64, 8-byte leaves
  for leaf in (np.arange(6, dtype=np.uint8), np.array([True, False, True]), jnp.arange(4, dtype=jnp.bfloat16)):
    sums = checkpoint.fingerprints({"a": {"x": leaf}})[0]["a"]
    assert sums == [int(np.asarray(leaf).view(f"u{np.asarray(leaf).dtype.itemsize}").astype(np.uint64).sum() % 2**32)]
  with jax.enable_x64(True):
    x64 = np.array([1.5, -2.25], np.float64)
    assert checkpoint.fingerprints({"a": {"x": x64}})[0]["a"] == [int(x64.view(np.uint32).astype(np.uint64).sum() % 2**32)]


def test_nan_guidance_and_bad_sampler_arguments_exit_2(tmp_path, straight, capsys):
  from asymflow_jax import sample
  cases = [(["--guidance=nan"], "--guidance=nan: expected a finite number >= 0"),
           (["--num=0"], "--num=0: expected at least 1 image"),
           (["--batch=-3"], "--batch=-3: expected at least 1"),
           (["--steps=0"], "--steps=0: expected at least 1"),
           (["--interval", "0.8", "0.2"], "--interval 0.8 0.2: expected 0 <= LO <= HI <= 1"),
           (["--sigma_min=0"], "--sigma_min=0.0: expected a number in (0, 1)"),
           (["--ema=3"], "--ema=3: the run has 1 EMA tree(s)")]
  # the real command line once (the exit status of the process) ...
  proc = _run(["-m", "asymflow_jax.sample", f"--workdir={straight}", *cases[0][0]])
  assert proc.returncode == 2 and cases[0][1] in proc.stderr, proc.stderr[-1500:]
  # ... and every case through the CLI's main in this process (SystemExit(2) is that exit status)
  for extra, needle in cases:
    with pytest.raises(SystemExit) as exit_:
      sample.main([f"--workdir={straight}", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err, (extra, err[-1500:])
  assert not (straight / "samples" / "sample_0000006.png").exists()


def test_sigma_min_override_reaches_the_recovery_clamp(tmp_path, straight):
  # Heun with 2 steps evaluates the model at sigma = 1 and 0.5: a clamp of 0.9 changes the velocity at
  # 0.5, the config's own value (4e-2) written out changes nothing.
  from asymflow_jax import sample
  def images(*extra):
    out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
    assert sample.main([f"--workdir={straight}", "--num=2", "--steps=2", "--method=heun", f"--out={out}", *extra]) == 0
    with np.load(f"{out}.npz") as f:
      return f["images"]
  default = images()
  assert np.array_equal(images("--sigma_min=0.04"), default)
  assert np.abs(images("--sigma_min=0.9").astype(int) - default).max() > 0


def test_evaluate_scores_the_requested_checkpoint(tmp_path, straight, capsys, digit_classifier):
  from asymflow_jax import evaluate
  def score(*extra):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    assert evaluate.main([f"--workdir={straight}", "--metric=fdd", "--num=10", "--steps=2", "--seed=3",
                          f"--classifier={digit_classifier}", f"--out={out}", *extra]) == 0
    return json.loads(out.read_text())
  latest, older = score(), score("--step=4")
  assert (latest["step"], older["step"]) == (6, 4) and latest["fdd"] != older["fdd"]
  assert evaluate.main([f"--workdir={straight}", "--metric=fdd", "--num=10", "--step=5",
                        f"--classifier={digit_classifier}"]) == 1
  assert "--step=5: the workdir has checkpoints at steps [2, 4, 6]" in capsys.readouterr().err


def test_nan_weights_and_nan_reference_statistics_fail_loudly(tmp_path, straight, capsys):
  # NaN EMA weights in the newest checkpoint: sampling refuses them (exit 1), no black PNG is written
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  (state, data), _ = _restore(wd, capsys)
  shutil.rmtree(wd / "checkpoints" / "6")
  mngr = checkpoint.manager(str(wd), tiny_train_config(6))
  nan_ema = jax.tree.map(lambda x: x * np.nan, state.params)
  checkpoint.save_train(mngr, state.replace(ema=(nan_ema,)), data, force=True)
  mngr.wait_until_finished()
  mngr.close()
  proc = _run(["-m", "asymflow_jax.sample", f"--workdir={wd}", "--num=2", "--steps=1", f"--out={tmp_path / 's'}"])
  assert proc.returncode == 1 and "item 'ema_0' holds NaN or Inf values" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npz").exists()
  # NaN reference statistics: an error, not "fid": NaN
  np.savez(tmp_path / "ref.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
  np.savez(tmp_path / "images.npz", images=np.zeros((20, 32, 32, 3), np.uint8))
  from asymflow_jax.evaluation import inception
  inception.save_inception_npz(tmp_path / "inc.npz", inception.random_inception_variables(jax.random.key(0)))
  from asymflow_jax import evaluate   # the evaluate CLI's main, in this process
  capsys.readouterr()
  assert evaluate.main([f"--images={tmp_path / 'images.npz'}", "--metric=fid", f"--inception={tmp_path / 'inc.npz'}",
                        f"--reference={tmp_path / 'ref.npz'}"]) == 1
  out, err = capsys.readouterr()
  assert "contain NaN or Inf values" in err and '"fid"' not in out, err[-2000:]


def test_evaluation_inputs_are_checked_before_any_image_is_generated(tmp_path, straight, monkeypatch, capsys):
  from asymflow_jax import evaluate, sampling
  monkeypatch.setattr(sampling, "generate_from_config", lambda *a, **k: pytest.fail("generated before checking"))
  assert evaluate.main(["--workdir", str(straight), "--metric=fid", "--inception", str(tmp_path / "none.npz"),
                        "--reference", str(tmp_path / "ref.npz")]) == 1
  assert "Inception weights" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(straight), "--metric=fid", "--num=5"]) == 1
  assert "--metric=fid needs --inception" in capsys.readouterr().err
  # in training: a missing eval file fails validation, before the first step
  c = tiny_train_config()
  c.eval.every, c.eval.metric = 2, "fid"
  c.eval.inception, c.eval.reference = str(tmp_path / "none.npz"), str(tmp_path / "ref.npz")
  with pytest.raises(ValueError, match=r"config.eval.inception='.*none.npz' does not exist"):
    config_lib.validate_config(c, 1)


CLIS = ["asymflow_jax.train", "asymflow_jax.sample", "asymflow_jax.evaluate", "asymflow_jax.convert", "asymflow_jax.demo",
        "asymflow_jax.subspace", "asymflow_jax.data.prep"]

# `python -m MODULE --help` for every CLI from one interpreter: the libraries they all import are
# imported once, then each command runs in a forked child (its own process: own exit status, own
# absl flags, its module run as __main__ as `python -m` does).
_HELP_SCRIPT = """
import json, os, runpy, sys, traceback
import jax, flax.linen, optax, orbax.checkpoint  # noqa: F401  (shared by the children)
results = {}
for module in sys.argv[1:]:
  sys.stdout.flush(); sys.stderr.flush()
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    os.dup2(w, 1)
    sys.argv = [module, "--help"]
    code = 0
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
  os.close(w)
  with os.fdopen(r) as f:
    out = f.read()
  results[module] = dict(code=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stdout=out)
print("HELP_RESULTS " + json.dumps(results))
"""


def test_every_cli_help_exits_0():
  proc = _run(["-c", _HELP_SCRIPT, *CLIS], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split("HELP_RESULTS ", 1)[1])
  assert list(results) == CLIS
  assert {m: r["code"] for m, r in results.items()} == dict.fromkeys(CLIS, 0), proc.stderr[-3000:]
  for module, r in results.items():
    assert "usage" in r["stdout"].lower() or "--workdir" in r["stdout"], (module, r["stdout"][:500])
