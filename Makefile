# One-command set-up: a venv with torch==2.13.0 (the CPU wheel) installed before the package,
# so that the package's own torch>=2.5 requirement is already met and nothing else is fetched.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.normfuse-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/normfuse demo

# two or more pytest workers (pytest-xdist): numba's compiles and the Triton interpreter are single-threaded
test: $(STAMP)
	$(PY) -m pytest -q -n auto

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info
