# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per set of extras, so neither target reinstalls after the other: `make run` needs the
# local stack's extra, everything else the test and lint tools too (which include it).
STACK_STAMP := $(VENV)/.installed-stack
STAMP := $(VENV)/.installed-dev

.PHONY: run test upstream lint bench browser clean

$(STACK_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[stack]'
	touch $(STACK_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,stack]'
	touch $(STAMP) $(STACK_STAMP)

run: $(STACK_STAMP)
	$(BIN)/proj up

# Chromium for the Flower browser tests: Debian's package where apt exists (Playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	  else $(BIN)/python -m playwright install chromium; fi; }

# The whole suite with proj's replacements on, then the tests of delivery, results, retries, canvas
# and crashes again with Celery's and kombu's own components (PROJ_STOCK_CELERY=1, docs/internals.md).
# TEST_PROCESSES pytest processes at once (pytest-xdist): a test file stays in one of them and the
# fault scenarios run one after another in one (tests/conftest.py); 1 runs everything in one process.
TEST_PROCESSES ?= 2
XDIST = $(if $(filter 1,$(TEST_PROCESSES)),,-n $(TEST_PROCESSES) --dist loadgroup)
test: $(STAMP) browser
	$(BIN)/python -m pytest $(XDIST)
	PROJ_STOCK_CELERY=1 $(BIN)/python -m pytest -m stock_too $(XDIST)
	$(BIN)/python tests/upstream/run.py

# kombu's and Celery's own integration tests, stock vs proj's layer (docs/upstream-tests.md).
upstream: $(STAMP)
	$(BIN)/python tests/upstream/run.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .local build *.egg-info
