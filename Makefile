# repeat_scaling: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint demo bench clean

# .venv/.installed is refreshed whenever setup.py changes.
$(VENV)/.installed: setup.py constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check repeat_scaling tests configs launch
	$(VENV)/bin/ruff format --check repeat_scaling tests configs launch

test: lint
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	@echo "make demo arrives with the end-to-end issue (sweeps, launchers, demo);"
	@echo "until then: make test runs every component that exists."
	@exit 1

bench: $(VENV)/.installed
	$(PY) -m repeat_scaling.bench data

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
