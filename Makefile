# Two entry points a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Console tools installed in the venv (hadolint, locust, promtool wrappers) must be found by the tests.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup serve test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: a bare "torch" requirement would otherwise pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

serve: setup
	$(BIN)/python -m service

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy converter service
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy converter service
