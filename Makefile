# The two set-up commands of the README. Each creates .venv if missing, installs, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxtl-installed
PYTEST_ARGS ?=
QUICKSTART_ARGS ?=
CHROMIUM := /usr/bin/chromium

.PHONY: quickstart test chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/jaxtl train configs/quickstart.yaml $(QUICKSTART_ARGS)

# The browser of tests/e2e/test_report.py: Debian's chromium, installed with apt-get when missing (as root).
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "make test: $(CHROMIUM) is missing; tests/e2e/test_report.py renders the run report in it and" \
				"fails without it. Install Debian's chromium: sudo apt-get install chromium" >&2; \
		fi; \
	fi

test: $(STAMP) chromium
	$(BIN)/python -m pytest -n 2 --dist worksteal $(PYTEST_ARGS)
