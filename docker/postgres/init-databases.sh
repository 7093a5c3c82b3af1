#!/usr/bin/env bash
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
# POSTGRES_DB (mlflow) is the tracking store; this adds the service's request log and the labelled
# reference data, a read-only role for Grafana's drift-status panel, and the tracking server's own
# role, which owns its database (the service, pipeline and archive roles: roles.sql, after the tables).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v grafana_password="$GRAFANA_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
ALTER DATABASE mlflow OWNER TO mlflow;
CREATE DATABASE requests;
CREATE DATABASE reference;
CREATE ROLE grafana_reader LOGIN PASSWORD :'grafana_password';
GRANT pg_read_all_data TO grafana_reader;
SQL
