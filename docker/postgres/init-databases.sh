#!/usr/bin/env bash
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
# POSTGRES_DB (mlflow) is the tracking store; this adds the service's request log and the labelled
# reference data, and a read-only role for Grafana's drift-status panel.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v grafana_password="$GRAFANA_DB_PASSWORD" <<'SQL'
CREATE DATABASE requests;
CREATE DATABASE reference;
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password';
GRANT pg_read_all_data TO grafana_reader;
SQL
