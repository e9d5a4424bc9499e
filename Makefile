# One virtual environment for everything; torch is pinned to the CPU wheel (no CUDA downloads).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

$(BIN)/medlava: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/medlava

demo: setup
	$(BIN)/medlava ask samples/phantom_chest_effusion.dcm "What modality is this?"
	$(BIN)/medlava ask samples/phantom_chest_effusion.dcm "Which side is the pleural effusion on?"
	$(BIN)/medlava ask samples/phantom_brain_mass.nii.gz "What abnormality is seen?" --json

lint: setup
	$(BIN)/ruff check src tests scripts bench

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/medlava bench
