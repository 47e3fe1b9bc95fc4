# `make up` runs the whole platform in the foreground; `make test` runs the checks and the test suite.
PYTHON ?= python3.11
VENV := .venv
PYTEST_ARGS ?=

.PHONY: up test

up: $(VENV)/.installed
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" exec bin/up

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml is newer than the stamp.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e .
	@touch $@

# The test extra includes everything `up` needs, so it satisfies both stamps.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[test]'
	@touch $@ $(VENV)/.installed
