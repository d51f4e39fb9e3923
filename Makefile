# The README's two commands: `make demo` (main job on the bundled data) and `make test`.
# Both run the idempotent set-up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint sid clean
setup:
	@./scripts/setup.sh

demo: setup
	$(PY) -m scripts.demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

sid: setup
	$(PY) -m model.semantic_ids build $(ARGS)

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
