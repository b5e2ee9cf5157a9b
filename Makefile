# Loopline: `make demo` runs the whole loop locally, `make test` runs the test suite.
# Both build the pinned environment (.venv) from requirements/lock.txt when it is missing.
PYTHON ?= python3.10
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
export UV_PYTHON_DOWNLOADS := never
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_USE_LEGACY_KERAS := 1

.PHONY: env demo test test-fast lint bench bench-score lock clean

env: $(STAMP)

# The venv is rebuilt only when the lock or setup.py changes.
$(STAMP): requirements/lock.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip sync --python $(PY) --compile-bytecode requirements/lock.txt
	$(UV) pip install --python $(PY) --no-deps -e .
	touch $(STAMP)

demo: env
	$(PY) -m pipelines.demo

test: env
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: env
	$(PY) -m pytest -m "not slow"

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: env
	$(PY) -m bench.join

bench-score: env
	$(PY) -m bench.score

# Re-resolve the full pinned set after editing requirements/requirements.in.
lock: env
	$(UV) pip compile --python $(PY) requirements/requirements.in \
	  --override requirements/overrides.txt -o requirements/lock.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
