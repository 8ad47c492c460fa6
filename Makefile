# Two commands do all the set-up on a fresh machine:
#   make train   # creates .venv on first use, then trains on the built-in corpus (5-8 min on 2 CPU cores)
#   make test    # creates .venv on first use, then runs the test suite
# The venv is reused afterwards; it is rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch. For a GPU, install the CUDA build for your system first, e.g.
#   make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" test
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/lm-lightning fit --config conf/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
