# Two commands matter: `make run` (set up, then run the pipeline) and `make test`.
# Only Python 3.11 and make are needed; everything else comes from the package index.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8

# The locks are compiled from pyproject.toml (`make lock`); the dev venv gets exactly
# requirements-dev.lock (runtime + dev tools), the image exactly requirements.lock (runtime).
# nvidia-nccl-cu12 (469 MB, a dependency of xgboost) is left out: nothing loads it.
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--generate-hashes --no-emit-package nvidia-nccl-cu12

.PHONY: setup lock run test test-unit lint bench bench-serving bench-scale clean

setup: $(VENV)/.installed

$(BIN)/uv:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# `uv pip sync` installs exactly the lock (hashes checked) and removes anything else (it keeps
# only pip, setuptools and uv).
$(VENV)/.installed: requirements-dev.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip sync --quiet --compile-bytecode --require-hashes --python $(BIN)/python requirements-dev.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

# Recompile both locks after a change to pyproject.toml. Locked versions stay unless asked,
# e.g. `make lock ARGS="--upgrade-package httpx"`; the dev lock keeps the runtime lock's pins.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile --quiet $(LOCK_FLAGS) $(ARGS) pyproject.toml -o requirements.lock
	$(BIN)/uv pip compile --quiet $(LOCK_FLAGS) $(ARGS) pyproject.toml --extra dev \
		-c requirements.lock -o requirements-dev.lock

run: setup
	$(BIN)/mlops run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(ARGS)

# ruff; deptry (every import declared in pyproject.toml); the import contracts of
# [tool.importlinter]: layers, forbidden upward imports, no cycles, independent stages.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/deptry .
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py $(ARGS)

bench-serving: setup
	$(BIN)/python benchmarks/bench_serving.py $(ARGS)

bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py $(ARGS)

clean:
	rm -rf $(VENV) .mlops
