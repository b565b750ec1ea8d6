"""Shared test set-up: CPU only, the committed parity fixtures, a bounded hypothesis profile."""

import os
import pathlib

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
  """The reference parity fixtures committed in ``tests/fixtures`` (copied from the project's shared
  fixtures: ``jit_tiny`` from the official AsymJiT code, ``pca_tiny`` from its PCA tool)."""
  return FIXTURES


@pytest.fixture(scope="session")
def digit_classifier(tmp_path_factory) -> pathlib.Path:
  """The default FDD digit classifier, trained once per test run (shared by the xdist workers under
  a file lock) and saved where the CLIs and the trainer look for it (``--classifier`` /
  ``WORKDIR/digit_classifier.msgpack``)."""
  import fcntl  # pylint: disable=import-outside-toplevel
  from asymflow_jax.evaluation import classifier  # pylint: disable=import-outside-toplevel
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = tmp_path_factory.getbasetemp().parent / f"clf-{uid}" if uid else tmp_path_factory.mktemp("clf")
  root.mkdir(parents=True, exist_ok=True)
  path = root / "digit_classifier.msgpack"
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.exists():
      tmp = root / "digit_classifier.tmp.msgpack"
      classifier.save_classifier(tmp, classifier.train_classifier(seed=0))  # the default, as in use
      os.replace(tmp, path)
    fcntl.flock(lock, fcntl.LOCK_UN)
  return path
