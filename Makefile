# Quick start: `make run` (set up .venv and run the default experiment), `make test` (set up and run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,sweeps]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m inferno

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check inferno tests scripts

clean:
	rm -rf $(VENV) outputs .pytest_cache

.PHONY: setup run test test-all lint clean
