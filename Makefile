# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-all test-fast lint bench
venv:
	VENV=$(VENV) scripts/setup_venv.sh

demo: venv
	$(PY) -m newtonlm.training.train

# CI's run: everything but the rest of the exhaustive matrices (marker `matrix`)
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not matrix" tests
	$(VENV)/bin/ruff check .

# everything, the matrices included
test-all: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	$(VENV)/bin/ruff check .

# the quick run while developing: everything but the tests marked slow (subprocess trainers, exports)
test-fast: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow and not matrix" tests
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m newtonlm.kernels.bench
	$(PY) -m newtonlm.models.bench
	$(PY) -m newtonlm.data.bench
	$(PY) -m newtonlm.training.bench
