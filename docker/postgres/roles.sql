-- Least privilege on PostgreSQL: the roles the service, the pipeline and the archive job log in as.
-- Run by `make postgres-roles` (psql, as the owner of both databases, connected to the request log's),
-- after the tables exist: the owner creates them (`python -m common.store --create`), never the roles
-- below, which cannot create, alter or drop anything. Idempotent: run it again after a migration or
-- to change a password. docs/scaling.md has the table of who may do what.
--
-- psql variables (-v): reference_db (the reference data's database, required); service_role,
-- pipeline_role, archive_role (default fraud_service, fraud_pipeline, fraud_archive).
-- Passwords from the environment (psql's \getenv): SERVICE_DB_PASSWORD, PIPELINE_DB_PASSWORD,
-- ARCHIVE_DB_PASSWORD; a role whose variable is unset keeps the password it has (or none).
\set ON_ERROR_STOP on
\if :{?service_role} \else \set service_role fraud_service \endif
\if :{?pipeline_role} \else \set pipeline_role fraud_pipeline \endif
\if :{?archive_role} \else \set archive_role fraud_archive \endif
\getenv service_password SERVICE_DB_PASSWORD
\getenv pipeline_password PIPELINE_DB_PASSWORD
\getenv archive_password ARCHIVE_DB_PASSWORD

-- Roles: LOGIN only; no superuser, no CREATEDB, no CREATEROLE, and they inherit nothing else.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', r)
  FROM unnest(ARRAY[:'service_role', :'pipeline_role', :'archive_role']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
\if :{?service_password}
ALTER ROLE :"service_role" PASSWORD :'service_password';
\endif
\if :{?pipeline_password}
ALTER ROLE :"pipeline_role" PASSWORD :'pipeline_password';
\endif
\if :{?archive_password}
ALTER ROLE :"archive_role" PASSWORD :'archive_password';
\endif

-- The request log (this database). Nobody but the owner creates objects in it (PostgreSQL 15's
-- default; older servers let every role create in schema public).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"service_role", :"pipeline_role", :"archive_role";
REVOKE ALL ON TABLE requests FROM :"service_role", :"pipeline_role", :"archive_role";
-- The service logs every scored row and reads it back (feedback finds its rows), and writes the
-- labels that /feedback brings: those two columns, not the scores or the features.
GRANT SELECT, INSERT ON TABLE requests TO :"service_role";
GRANT UPDATE ("Class", label_ts) ON TABLE requests TO :"service_role";
GRANT USAGE ON SEQUENCE requests_id_seq TO :"service_role";
-- Training, the drift and performance checks and the gate read the log (the gate's lock is an
-- advisory lock, which needs no grant).
GRANT SELECT ON TABLE requests TO :"pipeline_role";
-- The archive job on an unpartitioned log reads the rows it archives and deletes them. On a partitioned
-- log it creates and drops partitions, which only the owner may: there it runs as the owner.
GRANT SELECT, DELETE ON TABLE requests TO :"archive_role";

-- The reference data: read by the pipeline only; written by its owner (`python -m training.import_csv`).
\connect :reference_db
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"pipeline_role";
REVOKE ALL ON TABLE requests FROM :"service_role", :"pipeline_role", :"archive_role";
GRANT SELECT ON TABLE requests TO :"pipeline_role";
