# repeat_scaling: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint demo bench clean slurm cxx

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

# tests/test_launch_slurm.py starts a real slurmctld + slurmd: installs slurm-wlm and munge
# with apt-get when run as root (a no-op once installed); others install them by hand.
slurm:
	-bash .ci/install_slurm.sh

# model.attention_impl='cpu_fused' compiles its kernel with the host's C++ compiler.
cxx:
	-bash .ci/install_cxx.sh

test: lint slurm cxx
	$(PY) -m pytest -q tests

# prepare the built-in corpus -> demo sweep (train + evaluate) -> report in demo_out/report
demo: $(VENV)/.installed
	$(PY) launch/demo.py --out=demo_out

bench: $(VENV)/.installed
	$(PY) -m repeat_scaling.bench data
	$(PY) -m repeat_scaling.bench pipeline
	$(PY) -m repeat_scaling.bench train
	$(PY) -m repeat_scaling.bench eval

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
