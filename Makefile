# dptrain: `make demo` trains on the built-in synthetic faces with 2 workers; `make test` runs the test suite;
# `make check` is the contributors' quick tier (lint + the fast unit tests); `make docs` regenerates docs/cli.md.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DATA   ?= data/synth
WORKERS ?= 2

.PHONY: venv demo test test-avx2 check lint docs data bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot,export,tensorboard]'
	touch $@

venv: $(VENV)/.installed

$(DATA)/summary.json: | $(VENV)/.installed
	$(PY) -m dptrain data synth --out $(DATA)

data: $(DATA)/summary.json

demo: $(VENV)/.installed $(DATA)/summary.json
	$(PY) -m dptrain launch --config configs/synth.toml --workers $(WORKERS) --data $(DATA) --out runs/demo
	$(PY) -m dptrain plot runs/demo

# The oracle extra (torch==2.13.0, a CPU wheel) is optional: the PyTorch comparison tests skip without it.
# Lint first (pyflakes + import order, configured in pyproject.toml): it takes a second and catches dead imports.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

# The numerics-sensitive tests (pytest -m numerics) again on the AVX2 kernels of OpenBLAS, NumPy and PyTorch, as an
# AVX2-only CPU runs them: on an AVX-512 machine too (tests/kernels.py sets the variables; the session refuses to
# start unless the kernels really changed). docs/development.md.
test-avx2: lint
	$(PY) tests/kernels.py avx2 -q -m numerics tests

# The quick tier: every test not marked slow (tests/conftest.py marks the ones that start processes, train or time
# real work); docs/contributing.md says how the split was chosen.
check: lint
	$(PY) -m pytest -q -m "not slow" --durations=5 tests

docs: $(VENV)/.installed
	$(PY) tools/gen_cli_md.py

bench: $(VENV)/.installed
	$(PY) -m dptrain bench --workers 1,2 --out bench-out

clean:
	rm -rf $(VENV) runs bench-out
