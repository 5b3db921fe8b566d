# The two set-up commands of the README. Each creates .venv if missing, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxtl-installed
PYTEST_ARGS ?=

.PHONY: quickstart test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/jaxtl parity resnet18 --size 97x131
	$(BIN)/jaxtl parity resnet50 --size 64x64
	$(BIN)/jaxtl parity efficientnet_b0 --size 57x71

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)
