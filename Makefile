# Two commands on a fresh machine with Python 3.11 and make: `make run`, `make test`.
# Both create .venv on first use and reinstall when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help run test test-all reliability lint install dvc-repro clean-state

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: $(STAMP)  ## run the whole pipeline on the embedded default data
	$(BIN)/flywheel run

test: $(STAMP)  ## run the test suite, as CI does (all but the tests marked long)
	$(BIN)/pytest -m "not long"

test-all: $(STAMP)  ## every test, the long ones too (end-to-end runs and load tests of minutes each)
	$(BIN)/pytest

reliability: $(STAMP)  ## the reliability and security suite alone (tests/reliability) and pip-audit of .venv (report: benchmarks/results/pip-audit.json)
	FLYWHEEL_LOAD_REPORT=benchmarks/results/load.json $(BIN)/pytest -m reliability
	-$(BIN)/pip-audit --skip-editable --progress-spinner off --format json --output benchmarks/results/pip-audit.json
	$(BIN)/python -m tests.reliability.audit_report benchmarks/results/pip-audit.json

lint: $(STAMP)  ## ruff (lint + format), and the layer contracts of docs/architecture.md (import-linter)
	$(BIN)/ruff check flywheel tests benchmarks
	$(BIN)/ruff format --check flywheel tests benchmarks
	$(BIN)/lint-imports

install: $(STAMP)  ## create .venv and install flywheel with the dev extras

dvc-repro: $(STAMP)  ## the same data stages through DVC instead of Prefect
	$(BIN)/dvc repro

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
	  "Flywheel needs Python 3.11; found " + sys.version.split()[0] + " at " + sys.executable + \
	  ". Run: make PYTHON=/path/to/python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean-state:  ## delete generated state (data contents, caches, checkpoints, reports); keeps the model registry (mlflow/), the DVC remote and .venv unless ALL=1
	rm -rf data/raw data/validation data/prepared data/monitoring .prefect .flywheel reports checkpoints .dvc/cache .dvc/tmp
	@if [ "$(ALL)" = "1" ]; then rm -rf mlflow dvc-remote; echo "deleted the model registry (mlflow/) and the DVC remote (dvc-remote/) too"; \
	else echo "kept mlflow/ (the model registry, its champion) and dvc-remote/ (data versions): make clean-state ALL=1 deletes them too"; fi
