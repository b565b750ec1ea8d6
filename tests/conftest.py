"""Shared test set-up: CPU only, the committed parity fixtures, a bounded hypothesis profile."""

import fcntl
import json
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compile cache per test run, shared by the xdist workers and every subprocess
# they start (tiny configs recur across tests; compiling dominates their runtime).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"asymflow-test-jax-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Cheaper XLA:CPU code generation (LLVM passes only: IEEE semantics are kept, results are the same
# bits as the optimised build's); the tiny test programs are dominated by compile time.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = pathlib.Path(__file__).resolve().parents[1]


FIXTURES = REPO / "tests" / "fixtures"


def subprocess_env(devices: int | None = None) -> dict:
  """Environment for a test subprocess: CPU, the repository on the path, the test XLA flags and,
  if given, ``devices`` fake host devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = FAST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  return env


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """The fixtures committed in ``tests/fixtures``: reference parity fixtures copied from the project's
  shared fixtures (``jit_tiny`` from the official AsymJiT code, ``pca_tiny`` from its PCA tool), the
  diffusers FLUX.2, UniPC and transformers DINOv2 fixtures (made by ``tests/make_flux2_fixture.py``,
  ``tests/make_unipc_fixture.py`` and ``tests/make_dinov2_fixture.py`` where torch + diffusers /
  transformers are installed) and the default digit classifier (see :func:`digit_classifier`)."""
  return FIXTURES


def run_root(tmp_path_factory) -> pathlib.Path:
  """A folder of this test run shared by all its xdist workers (per worker without xdist)."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = tmp_path_factory.getbasetemp().parent / f"shared-{uid}" if uid else tmp_path_factory.getbasetemp() / "shared"
  root.mkdir(parents=True, exist_ok=True)
  return root


def build_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """``run_root/name``, made by ``build(path)`` once per test run: the first worker to ask builds it
  under a file lock, the others wait for it and reuse it (expensive set-up such as a trained
  workdir). A failed build leaves nothing behind, so the next test to ask builds it again. Users
  must not modify it (copy it first)."""
  root = run_root(tmp_path_factory)
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        build(path)
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path


def flat_params(tree) -> dict:
  """``keystr(path) -> numpy array`` of a parameter tree (how tests compare and store trees)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
  """An uninterrupted 4-step run of ``tests/train_config.py`` with REPA on one device (checkpoints at 2 and 4,
  the end-of-training grid ``samples/step_0000004.png``), trained once per test run (xdist workers
  share it): {workdir, params, ema} with the final params and EMA as ``keystr(path) -> array``.
  Read only: copy the workdir before resuming in it."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from asymflow_jax import trainer  # pylint: disable=import-outside-toplevel
  from tests.train_config import tiny_train_config  # pylint: disable=import-outside-toplevel

  def build(root):
    state = trainer.train(tiny_train_config(4, repa=True), str(root / "wd"), progress=False).state
    assert int(state.step) == 4 and jax.device_count() == 1
    np.savez(root / "final.npz", **{"params" + k: v for k, v in flat_params(state.params).items()},
             **{"ema" + k: v for k, v in flat_params(state.ema[0]).items()})
  root = build_once(tmp_path_factory, "tiny-run-4", build)
  with np.load(root / "final.npz") as f:
    params = {k[len("params"):]: f[k] for k in f.files if k.startswith("params")}
    ema = {k[len("ema"):]: f[k] for k in f.files if k.startswith("ema")}
  return dict(workdir=root / "wd", params=params, ema=ema)


def as_killed(workdir, copy, *, checkpoint: int, logged: int) -> pathlib.Path:
  """``copy``: the finished run ``workdir`` as a kill after step ``logged`` would have left it, with
  ``checkpoint`` its newest committed step: later step folders, later metrics rows and the
  end-of-training samples removed. Resuming it must reproduce ``workdir`` exactly."""
  workdir, copy = pathlib.Path(workdir), pathlib.Path(copy)
  shutil.copytree(workdir, copy)
  for step in (copy / "checkpoints").iterdir():
    if int(step.name) > checkpoint:
      shutil.rmtree(step)
  shutil.rmtree(copy / "samples", ignore_errors=True)
  rows = (copy / "metrics.jsonl").read_text().splitlines()
  (copy / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= logged))
  return copy


@pytest.fixture(scope="session")
def digit_classifier(fixtures_dir) -> pathlib.Path:
  """The default FDD digit classifier (``classifier.train_classifier(seed=0)``, 600 steps; held-out
  accuracy 0.976), committed so the suite does not retrain it (~1 min of CPU) on every run. Made by
  ``classifier.save_classifier(PATH, classifier.train_classifier(seed=0), seed=0, steps=600,
  held_out_accuracy=...)``; tests/test_evaluation.py checks its accuracy on the held-out digits and
  that training itself learns. Read only: copy it to ``WORKDIR/digit_classifier.msgpack`` (or pass
  ``--classifier``) where a CLI or the trainer should find it."""
  return fixtures_dir / "digit_classifier.msgpack"


# ------------------------------------------------------------------ xdist: the slowest work first
# `make test` runs `pytest -n 2`. xdist's default scheduling hands out tests in file order, in
# chunks, so a test that takes minutes can start late and leave one worker running alone at the
# end. Here the work is handed out one unit at a time to whichever worker is free: the units in
# SLOW_FIRST first (roughly slowest first, as measured on 2 CPU cores), then the rest in file order.
# A unit is one test in the modules of SPLIT_MODULES (independent, individually slow tests) and a
# whole module otherwise, so that module-scoped fixtures (a compiled train step, model weights)
# are set up once, on one worker. tests/test_multiprocess.py is one unit on purpose: its
# 2-process jobs then never run at the same time as each other (on 2 cores, two of them at once
# starve the processes' coordination barriers). This only changes where and when tests run,
# never what runs. It applies to the default `--dist load`; an explicit --dist mode is left alone.

SPLIT_MODULES = frozenset({
    "tests/test_train.py", "tests/test_faults.py", "tests/test_sampling.py",
    "tests/test_model.py", "tests/test_evaluate_cli.py", "tests/test_workdir.py",
})
SLOW_FIRST = (   # module paths (units) or node ids (a parametrized test: all its cases)
    "tests/test_multiprocess.py",
    "tests/test_train.py::test_eight_devices_match_one",
    "tests/test_evaluation.py",
    "tests/test_train.py::test_rank_zero_and_full_rank_checkpoint_and_resume",
    "tests/test_train_step_hand.py",
    "tests/test_faults.py::test_sigterm_saves_exits_0_and_resumes_bitwise",
    "tests/test_workdir.py::test_train_finetunes_a_converted_workdir",
    "tests/test_asymflux2.py",
    "tests/test_finetune.py",
    "tests/test_model.py::test_b16_init_and_jitted_forward",
    "tests/test_bench.py",
    "tests/test_train.py::test_pod_train_steps_lower_on_8_fake_devices",
    "tests/test_train.py::test_nonfinite_loss_is_reported_and_not_saved",
    "tests/test_sampling.py::test_images_do_not_depend_on_device_count",
    "tests/test_faults.py::test_error_in_the_loop_keeps_the_checkpoint_and_is_reported_once",
    "tests/test_workdir.py::test_converted_workdir_is_sampled_and_scored_by_the_clis",
)


def work_unit(nodeid: str) -> str:
  module = nodeid.split("::", 1)[0]
  return nodeid if module in SPLIT_MODULES else module


def _slow_rank(unit: str) -> int:
  for i, prefix in enumerate(SLOW_FIRST):
    if unit == prefix or unit.startswith(prefix + "["):
      return i
  return len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):
  """On the xdist workers (each collects the same, so they agree): the order the scheduler hands
  the units out in. Stable: a module unit stays together and in file order."""
  if hasattr(config, "workerinput") and config.workerinput.get("asymflow_slow_first"):
    order = {id(item): (_slow_rank(work_unit(item.nodeid)), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """xdist controller -> worker: whether this run uses the scheduler below."""
  node.workerinput["asymflow_slow_first"] = node.config.getvalue("dist") == "load"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class SlowFirstScheduling(LoadScopeScheduling):
    """LoadScopeScheduling with the units above, handed out in collection order (not by size)."""

    def _split_scope(self, nodeid):
      return work_unit(nodeid)

    def schedule(self):
      reorder = self.config.option.loadscopereorder
      self.config.option.loadscopereorder = False
      try:
        super().schedule()
      finally:
        self.config.option.loadscopereorder = reorder

  return SlowFirstScheduling(config, log)
