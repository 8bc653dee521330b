# Set-up and the two everyday jobs. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,app,fl,bench,dev,node
DEMO_OUT ?= demo_out

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first and pinned: otherwise pip resolves monai to a multi-GB CUDA build
	# (docs/ARCHITECTURE.md, "Torch first and pinned")
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]" torch==2.13.0
	touch $(STAMP)

# a synthetic DICOM session (made once, then reused) through the app with the shipped weights, scored against truth
demo: $(STAMP)
	rm -rf $(DEMO_OUT)/app
	$(PY) app/demo.py --data $(DEMO_OUT)/data --out $(DEMO_OUT)/app -m bundle

test: $(STAMP)
	$(PY) -m pytest -q

# everything but the tests marked slow (front ends in their own processes; pyproject.toml says which); `make test` runs all
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff, then mypy on src/prostate_jrs (its settings: [tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks federated app
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO_OUT)
