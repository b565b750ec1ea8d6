"""Shared test set-up: CPU only, the shared fixtures folder, a bounded hypothesis profile."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_fixtures() -> pathlib.Path:
  """../shared/fixtures next to the repository (CI lays shared/ beside the clone)."""
  root = pathlib.Path(os.environ.get("ASYMFLOW_SHARED", REPO.parent / "shared"))
  path = root / "fixtures"
  if not path.is_dir():
    raise FileNotFoundError(f"parity fixtures not found at {path}; set ASYMFLOW_SHARED to the shared/ folder.")
  return path


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return shared_fixtures()
