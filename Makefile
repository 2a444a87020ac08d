# Two entry points a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Console tools installed in the venv (hadolint, locust) must be found by the tests, and so must nginx and
# haproxy, which Debian installs in sbin (not on a non-root PATH).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH):/usr/local/sbin:/usr/sbin:/sbin

.PHONY: setup serve test test-deps lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: a bare "torch" requirement would otherwise pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

serve: setup
	$(BIN)/python -m service

# Programs the tests run besides Python (promtool, prometheus, nginx, haproxy): installed with apt-get when
# root, else one line saying what to install. First, so a missing one stops the run before the long setup.
test-deps:
	$(PYTHON) scripts/test_deps.py

test: test-deps setup
	$(BIN)/ruff check .
	$(BIN)/mypy converter service
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy converter service
