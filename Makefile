# One entry point for people and CI: install, demo, test, lint, bench.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DATA ?= ../shared/data/ml-100k
RUN ?= runs/ml-100k
PRESET ?= small

.PHONY: install tools demo down evaluate loadtest chaos test test-fast lint bench bench-quick export triton serve clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv and install the project (editable) with its pinned dependencies

$(STAMP): pyproject.toml
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

tools:  ## tools the tests use: prometheus (Debian's, into .tools/), docker-compose (validator), kubectl (kustomize v5)
	bash scripts/install-tools.sh

demo: install  ## ml-100k end to end: prepare -> tokenize -> train (small) -> onerec up (export, Redis, Triton, gateway) -> recommendations; reuses what is built
	$(BIN)/onerec prepare --source movielens --path $(DATA) --out $(RUN) --reuse
	$(BIN)/onerec tokenize --run $(RUN) --reuse
	$(BIN)/onerec train --run $(RUN) --preset $(PRESET) --reuse
	$(BIN)/onerec up --run $(RUN)
	$(BIN)/onerec recommend --run $(RUN) --count 3
	@echo
	@echo "The stack keeps running: curl -s -XPOST localhost:8080/recommend -H 'content-type: application/json' -d '{\"user_id\": \"1\"}'"
	@echo "Load-test it with 'make loadtest'; stop it with '$(BIN)/onerec down --run $(RUN)' (or 'make down')."

LOADTEST_ARGS ?=

loadtest: install  ## locust headless against the running local stack (make demo / onerec up); results in runs/loadtest/<UTC time>/
	$(BIN)/python -m loadtest.run --run $(RUN) $(LOADTEST_ARGS)

CHAOS_ARGS ?=

chaos: install  ## start a stack (Redis Cluster 3x1, 2 Tritons), locust load with faults injected; table into docs/RELIABILITY.md
	$(BIN)/python -m loadtest.chaos --run $(RUN) --doc docs/RELIABILITY.md $(CHAOS_ARGS)

down: install  ## stop the stack `make demo` / `onerec up` started
	$(BIN)/onerec down --run $(RUN)

evaluate: install  ## offline Recall@5 / NDCG@5 of the demo run on its held-out users (beam 128)
	$(BIN)/onerec evaluate --run $(RUN)

test: install tools  ## the whole test suite, integration and slow tests included
	$(BIN)/python -m pytest

test-fast: install  ## unit tests only
	$(BIN)/python -m pytest -m 'not integration and not slow'

lint: install  ## ruff, then the import-linter layering contracts (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo --no-cache

bench: install  ## benchmarks (results go to docs/PERFORMANCE.md by hand, with the command and machine)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/tokenizer_scale.py --json runs/tokenizer_scale.json
	$(BIN)/python benchmarks/beam_vs_hf.py --json --out runs/bench
	$(BIN)/python benchmarks/gateway_overhead.py --run $(RUN) --json

bench-quick: install  ## the serving benchmark, reduced (under 3 minutes)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/beam_vs_hf.py --quick --json --out runs/bench-quick

export: install  ## export the demo run into model_repo/ (a new version) and check it against torch
	$(BIN)/onerec export --run $(RUN) --out model_repo --verify

triton: install  ## serve model_repo/ with the real tritonserver on 127.0.0.1:8000/8001/8002 (Ctrl-C stops)
	$(BIN)/onerec triton --model-repo model_repo

serve: install  ## the gateway on 127.0.0.1:8080 (ONEREC_* settings; Redis and `make triton` running)
	$(BIN)/onerec serve

clean:  ## remove the venv and generated runs
	rm -rf $(VENV) runs .tools .pytest_cache .ruff_cache
