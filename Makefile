# One virtual environment for everything; torch is pinned to the CPU wheel (no CUDA downloads).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MODEL ?= build/tiny-random

.PHONY: setup demo test lint

$(BIN)/medlava: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/medlava

$(DEMO_MODEL)/config.json: | setup
	$(BIN)/python -m medlava.model.random_init $(DEMO_MODEL)

demo: setup $(DEMO_MODEL)/config.json
	$(BIN)/medlava ask samples/chest_xray.dcm "What modality is this?" --model $(DEMO_MODEL) --max-tokens 16 --json

lint: setup
	$(BIN)/ruff check src tests scripts

test: lint
	$(BIN)/python -m pytest
