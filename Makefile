# Two commands matter: `make run` and `make test` (see README). Everything else is a step they use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 5000
export HOST PORT

.PHONY: run test bench lint ui data model token reliability clean-runtime

# The venv is rebuilt only when a pin changes: the stamp depends on the pin files.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

venv: $(STAMP)

# Reference data and a first model, each built only when missing.
data/creditcard.csv: | $(STAMP)
	$(PY) -m training.generate --rows 284807 --seed 0 --out $@

data/reference_data.db: | data/creditcard.csv $(STAMP)
	$(PY) -m training.import_csv --csv data/creditcard.csv --db $@

data: data/reference_data.db

model: data $(STAMP)
	$(PY) -m training.bootstrap

run: model
	$(PY) -m service.launch

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --host $(HOST) --port $${MLFLOW_UI_PORT:-5001}
