# Two entry points (see README): `make demo` and `make test`. Both create .venv with the pinned set.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where the demo writes its outputs.
WORKDIR ?= workdirs/demo
# pytest workers; CI machines have 2 cores.
JOBS ?= 2

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(JOBS) --durations=20 tests

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m asymflow_jax.demo --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) workdirs .pytest_cache .hypothesis
