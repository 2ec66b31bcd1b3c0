# Two entry points, each of which sets up .venv on first use: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[experiments,test]'
	touch $@

.PHONY: run test lint
run: $(VENV)/.installed
	$(VENV)/bin/python -m experiments.char_lm $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n auto --dist loadfile $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
