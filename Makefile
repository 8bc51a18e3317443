PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast typecheck demo bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,onnx,wsi]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

typecheck: $(STAMP)
	$(BIN)/python -m mypy embedstore

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# the benchmarks' quick (smoke) modes; full runs are per script, see each docstring
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py --quick
	$(BIN)/python benchmarks/bench_store.py --rows 100000
	$(BIN)/python benchmarks/bench_extract.py --quick

clean:
	rm -rf $(VENV) build *.egg-info demo-out
