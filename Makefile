# chatforge — the two commands a newcomer runs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint system-deps clean

$(PY):
	python3 -m venv $(VENV)

# torch first, in its own step: the pinned CPU wheel; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# System packages that later tests need (browser, database); idempotent.
system-deps:
	@if [ -n "$(SYSTEM_PACKAGES)" ]; then apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES); fi

demo: install
	$(VENV)/bin/chatforge demo

test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

bench: install
	$(VENV)/bin/chatforge bench pretrain

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
