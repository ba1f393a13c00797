# Kalla: the two first commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

## make demo: install, reconcile the bundled invoices and payments, print the summary
demo: $(STAMP)
	$(PY) examples/make_demo_data.py examples/demo
	bin/kalla-run examples/demo/job.json

## make test: install and run the whole test suite
test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest tests/test_hot_paths.py --benchmark-enable -p no:cacheprovider
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) state build *.egg-info .pytest_cache examples/demo/output
