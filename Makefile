# Two entry points: `make train` and `make test` (CI: .ci/run). Both create .venv from
# pyproject.toml on first use (and again when pyproject.toml changes); nothing is
# installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train infer test test-quick docs lint format bench clean

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

test-quick: $(VENV)/.installed-test  # while developing: no end-to-end runs marked slow
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

docs: $(VENV)/.installed  # regenerate docs/configuration.md and the tables of docs/benchmarks.md
	$(BIN)/python docs/generate.py
	$(BIN)/python benchmarks/table.py --docs

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/warp.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
