# Two commands matter: `make run` (set up, then run the pipeline) and `make test`.
# Only Python 3.11 and make are needed; everything else comes from the package index.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8

.PHONY: setup run test test-unit lint bench bench-serving bench-scale clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

run: setup
	$(BIN)/mlops run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(ARGS)

# ruff, then the import contracts of pyproject.toml ([tool.importlinter]): layers, forbidden
# upward imports, no cycles, independent stages.
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py $(ARGS)

bench-serving: setup
	$(BIN)/python benchmarks/bench_serving.py $(ARGS)

bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py $(ARGS)

clean:
	rm -rf $(VENV) .mlops
