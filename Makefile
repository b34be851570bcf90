# Two entry points: `make train` and `make test`. Both create .venv from pyproject.toml
# on first use (and again when pyproject.toml changes); nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train infer test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(VENV)/.installed $@

train: $(VENV)/.installed
	$(BIN)/python train.py $(ARGS)

infer: $(VENV)/.installed
	$(BIN)/python infer.py $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/warp.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
