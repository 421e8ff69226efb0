# The README's commands. Everything installs into .venv from pyproject.toml, pinned by constraints.txt.
SHELL := bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit lint ui ui-screenshots bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	$(PY) -c "import torch, torchvision, ray, mlflow, pyarrow, torchmetrics, sklearn, yaml, pytest"
	touch $(STAMP)

run: install
	$(PY) -m pipelines run --config configs/quickstart.yaml

test: install
	$(PY) -m pytest -q -ra tests

test-unit: install
	$(PY) -m pytest -q -ra tests/unit

lint: install
	$(VENV)/bin/ruff check gan pipelines tests bench

ui: install
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///runs/mlflow.db

# docs/ui-*.png from the quickstart's store (make run first); needs Chromium: apt-get install -y chromium
ui-screenshots: install
	$(PY) -m bench.ui_screenshots

clean:
	rm -rf runs data .pytest_cache
