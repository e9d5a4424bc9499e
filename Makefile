# One virtual environment for everything; torch is pinned to the CPU wheel (no CUDA downloads).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench browser

$(BIN)/medlava: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/python -m medlava.kernels  # build the CPU kernels now, not on the first request
	bash scripts/install_tcmalloc.sh  # the allocator the medlava command preloads (where root and apt-get allow)
	touch $@

setup: $(BIN)/medlava

demo: setup
	$(BIN)/medlava ask samples/phantom_chest_effusion.dcm "What modality is this?"
	$(BIN)/medlava ask samples/phantom_chest_effusion.dcm "Which side is the pleural effusion on?"
	$(BIN)/medlava ask samples/phantom_brain_mass.nii.gz "What abnormality is seen?" --json

lint: setup
	$(BIN)/ruff check src tests scripts bench

# Debian's chromium for the web UI browser test, where root and apt-get allow (quick when present).
browser:
	bash scripts/install_browser.sh

test: lint browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/medlava bench
