# Headway: `make install` sets up .venv (CPU torch from this machine's disk first), `make test` runs the suite
# (`make test-fast`: all but the slow tests).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first, pinned, so that no dependency pulls a multi-GB CUDA build;
# the package metadata itself admits any recent torch for users with other needs.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The Node.js example client (clients/node): its packages are installed only where node and
# npm exist; elsewhere this step is skipped and its test skips with the reason.
NODE_DIR   := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
HAVE_NODE  := $(shell command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && echo yes)

.PHONY: install test test-fast lint protos demo bench bench-model bench-trainer bench-sampler bench-gateway bench-loop gpu-check clean

install: $(STAMP) $(if $(HAVE_NODE),$(NODE_STAMP))

# Re-run only when the dependency list changes: a second `make install` takes no time.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test]'
	# tinker-cookbook for its test: without tml-renderers>=0.4.1 (not on PyPI here; the
	# cookbook needs it only for Inkling models), its other dependencies in [test].
	$(PIP) install --quiet --no-deps tinker-cookbook==0.6.1
	# lm-eval for its local-completions test, the same way (its API backend's imports in [test]).
	$(PIP) install --quiet --no-deps lm_eval==0.4.13
	touch $(STAMP)

# Re-run only when package.json or the lockfile changes (npm ci starts from an empty
# node_modules, so the stamp inside it is written afresh after every install).
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

test: install
	$(PY) -m pytest -q

# The developer's inner loop: every test not marked slow (under a minute on 2 cores).
# Two workers (pytest-xdist): these tests wait on gRPC and Redis round trips as much as
# they compute, so two share two cores well. `make test` stays one process.
test-fast: install
	$(PY) -m pytest -q -m "not slow" -n 2

# ruff, then the layers of design.md as import-linter contracts ([tool.importlinter]).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# GRPO on the project's own base, end to end on embedded defaults (see examples/demo.py):
# builds tiny-arith once (cached in $$HEADWAY_HOME/bases), store and logs in .demo/.
demo: install
	$(PY) examples/demo.py

protos: install
	$(PY) protos/generate.py

bench: bench-model bench-trainer bench-sampler bench-gateway

# The bench-* targets measure the CPU, services they start as processes included (their
# --device twin); `make gpu-check` measures a GPU.
bench-model: install
	HEADWAY_DEVICE=cpu $(PY) bench/bench_model.py

bench-trainer: install
	HEADWAY_DEVICE=cpu $(PY) bench/bench_trainer.py

bench-sampler: install
	HEADWAY_DEVICE=cpu $(PY) bench/bench_sampler.py

bench-gateway: install
	HEADWAY_DEVICE=cpu $(PY) bench/bench_gateway.py

bench-loop: install
	HEADWAY_DEVICE=cpu $(PY) bench/bench_loop.py

# On a machine with a CUDA GPU (never run on this project's machines, which have none):
# the gpu-marked tests (parity on cuda: prefill + decode = full forward, sampler logprobs =
# trainer logprobs in-process and through `headway serve --device cuda`), then the decoder,
# sampler engine and trainer figures on cuda against transformers on the same GPU. torch
# must be a CUDA build of it (`make install TORCH=...` installs the one you name); the
# first step says so and stops if torch sees no GPU.
gpu-check: install
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
	'gpu-check: torch ' + torch.__version__ + ' sees no CUDA device here')"
	$(PY) -m pytest -q -m gpu -rs
	$(PY) bench/bench_device.py --device cuda

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .demo
