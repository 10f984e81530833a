# Two commands do everything on a fresh clone:  make run  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Runs the bridge on config/routes.yaml with SQLite under ./data; no credentials needed.
run: $(STAMP)
	$(BIN)/bridge serve --config config/routes.yaml

# The whole suite: lint, types, unit, integration (real peers) and acceptance tests.
test: $(STAMP)
	$(BIN)/ruff check bridge tests $(wildcard benchmarks)
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
