# The two set-up commands of the README. Each creates .venv if missing, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxtl-installed
PYTEST_ARGS ?=
QUICKSTART_ARGS ?=

.PHONY: quickstart test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/jaxtl train configs/quickstart.yaml $(QUICKSTART_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal $(PYTEST_ARGS)
