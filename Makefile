# The README's two commands: `make demo` (main job on the bundled data, or `make demo DATA=folder`) and `make test`.
# Both run the idempotent set-up first. `make stack` builds and starts the docker-compose stack for real
# (scripts/stack.sh, docs/DEPLOY.md); `make stack-down` removes it, volumes included.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint sid clean stack stack-down
setup:
	@./scripts/setup.sh

demo: setup
	$(PY) -m scripts.demo $(if $(DATA),--data $(DATA)) $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

stack: setup
	./scripts/stack.sh up

stack-down:
	./scripts/stack.sh down

sid: setup
	$(PY) -m model.semantic_ids build $(ARGS)

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
