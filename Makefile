# Headway: `make install` sets up .venv (CPU torch from this machine's disk first), `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first, pinned, so that no dependency pulls a multi-GB CUDA build;
# the package metadata itself admits any recent torch for users with other needs.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test lint protos bench bench-model bench-trainer clean

install: $(STAMP)

# Re-run only when the dependency list changes: a second `make install` takes no time.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: install
	$(PY) protos/generate.py

bench: bench-model bench-trainer

bench-model: install
	$(PY) bench/bench_model.py

bench-trainer: install
	$(PY) bench/bench_trainer.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
