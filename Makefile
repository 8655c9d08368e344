# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# `make test PYTHON=python3.13 VENV=.venv313` tests another Python in a venv of its own;
# CONSTRAINTS=file pins what pip may pick (CI pins a JAX series that way); PYTEST_ARGS adds
# pytest options (`PYTEST_ARGS="-m 'not slow'"` is the fast tier).
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?=
PYTEST_ARGS ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench system-deps clean notebooks

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# graphviz's `dot` program draws the graphs; install it where it is missing and we may.
system-deps:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
	      || echo "warning: could not install graphviz (dot); drawings will be skipped"; \
	  else echo "warning: graphviz 'dot' not found; install it (e.g. apt-get install graphviz) to draw graphs"; fi; }

demo: $(STAMP) system-deps
	$(BIN)/python -m graphopt demo

test: $(STAMP) system-deps
	$(BIN)/python -c "import sys, jax; print('testing on Python', sys.version.split()[0], 'JAX', jax.__version__)"
	$(BIN)/python -m pytest -q -n 2 tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/fusion_bench.py
	$(BIN)/python bench/remat_bench.py

# Re-execute every notebook in place (they are committed with their outputs).
notebooks: $(STAMP) system-deps
	$(BIN)/python notebooks/execute.py

clean:
	rm -rf .venv .venv-* graphopt-report .pytest_cache *.egg-info
