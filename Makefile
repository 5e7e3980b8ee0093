# One command to try the platform, one to test it. See README.md.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint boundaries bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[ml,dev]'
	touch $(STAMP)

setup: $(STAMP)

## Set everything up and run web + worker on the embedded default (SQLite, filesystem broker).
run: $(STAMP)
	$(PY) manage.py migrate --no-input
	$(PY) manage.py load_demo
	$(PY) manage.py demo_policy
	bin/run-dev

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## annotation/ and frontend/ (the web process) never import torch, rewards or training.
boundaries: $(STAMP)
	$(PY) -m pytest -q tests/test_boundaries.py

## The whole suite: lint, boundaries, tests (PostgreSQL and Redis when DATABASE_URL / CELERY_BROKER_URL are set).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

clean:
	rm -rf $(VENV) var
