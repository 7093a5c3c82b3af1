"""Monthly range partitions of the request log on PostgreSQL.

A partitioned log is `requests` partitioned by `ts` (epoch seconds) into one partition per UTC
month, `requests_YYYY_MM`, plus `requests_default` for any row outside them: a safety net, so a
row never fails for want of a partition (docs/decisions/030-postgresql-monthly-partitions.md).
Partitions are created ahead of time, when a service worker opens the log and by the archive job,
never on the request path; the archive job detaches and drops a month once every row of it is in
the archive. The primary key is (id, ts) and the unique key (request_id, ts): PostgreSQL requires
the partition key in both.

`python -m common.partitions migrate URL` turns an existing unpartitioned log into a partitioned one.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

import sqlalchemy as sa

from common.store import RequestStore, describe, requests_table

DEFAULT = "requests_default"


def _columns() -> list[sa.Column]:
    columns = []
    for column in requests_table.columns:
        if column.name == "id":
            columns.append(sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True))
        elif column.name == "ts":
            columns.append(sa.Column("ts", sa.Float, primary_key=True, nullable=False))
        else:
            columns.append(sa.Column(column.name, column.type, nullable=column.nullable))
    return columns


def partitioned_table(name: str) -> sa.Table:
    """The partitioned `requests` table's definition under `name` (constraint names fixed by name)."""
    return sa.Table(
        name, sa.MetaData(), *_columns(),
        sa.UniqueConstraint("request_id", "ts", name=f"{name}_request_id_ts_key"),
        sa.Index(f"{name}_ts_idx", "ts"),
        postgresql_partition_by="RANGE (ts)",
    )


def month_bounds(ts: float) -> tuple[str, float, float]:
    """('YYYY_MM', start, next month's start) of the UTC month of an epoch time."""
    at = datetime.fromtimestamp(ts, UTC)
    start = datetime(at.year, at.month, 1, tzinfo=UTC)
    end = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
    return f"{at.year:04d}_{at.month:02d}", start.timestamp(), end.timestamp()


def is_partitioned(engine: sa.Engine, table: str = "requests") -> bool:
    """Whether `table` is a partitioned table (PostgreSQL only)."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        kind = conn.execute(sa.text("SELECT relkind FROM pg_class WHERE relname = :t AND "
                                    "relnamespace = current_schema()::regnamespace"), {"t": table}).scalar()
    return kind == "p"


def partitions(engine: sa.Engine) -> dict[str, tuple[float, float] | None]:
    """{partition name: (from, to)} of `requests`, None for the default partition."""
    sql = sa.text("""
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'requests'::regclass""")
    out: dict[str, tuple[float, float] | None] = {}
    with engine.connect() as conn:
        for name, bound in conn.execute(sql):
            if bound == "DEFAULT":
                out[name] = None
            else:  # FOR VALUES FROM ('1700000000') TO ('1702592000')
                low, high = (part.split("(")[1].split(")")[0].strip("'") for part in bound.split(" TO "))
                out[name] = (float(low), float(high))
    return out


def create_partitioned(engine: sa.Engine, name: str = "requests") -> None:
    """Create the partitioned table, its default partition and this month's and next month's."""
    table = partitioned_table(name)
    with engine.begin() as conn:
        table.create(conn)
        conn.exec_driver_sql(f'CREATE TABLE "{name}_default" PARTITION OF "{name}" DEFAULT')
    if name == "requests":
        ensure_partitions(engine, time.time(), time.time() + 31 * 86_400)


def ensure_partitions(engine: sa.Engine, since: float, until: float) -> list[str]:
    """Create the monthly partitions that cover [since, until] and are missing; the names created.

    Rows already in the default partition for a new month move into it, in the same transaction.
    Several processes may create the same partition at once: the loser finds it there.
    """
    existing = partitions(engine)
    created = []
    ts = since
    while True:
        suffix, start, end = month_bounds(ts)
        name = f"requests_{suffix}"
        if name not in existing:
            try:
                _create_month(engine, name, start, end)
                created.append(name)
            except sa.exc.DBAPIError:
                if name not in partitions(engine):
                    raise
        if end > until:
            return created
        ts = end


def _create_month(engine: sa.Engine, name: str, start: float, end: float) -> None:
    with engine.begin() as conn:
        # The new month's rows that fell into the default partition move to the new partition; the
        # attach then finds none left there (it checks).
        conn.exec_driver_sql(f'CREATE TABLE "{name}" (LIKE requests INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
        conn.exec_driver_sql(f'WITH moved AS (DELETE FROM "{DEFAULT}" WHERE ts >= {start!r} AND ts < {end!r} '  # noqa: S608
                             f'RETURNING *) INSERT INTO "{name}" SELECT * FROM moved')  # names and numbers of ours
        conn.exec_driver_sql(f'ALTER TABLE requests ATTACH PARTITION "{name}" FOR VALUES FROM ({start!r}) '
                             f'TO ({end!r})')


def drop_partition(conn: sa.Connection, name: str) -> None:
    """Detach and drop one partition, inside the caller's transaction."""
    conn.exec_driver_sql(f'ALTER TABLE requests DETACH PARTITION "{name}"')
    conn.exec_driver_sql(f'DROP TABLE "{name}"')


def migrate(location: str) -> int:
    """Turn an unpartitioned `requests` table into a partitioned one, in one transaction; rows moved.

    Writers wait on the table's lock while the rows are copied (about as long as the copy takes):
    stop the service first, or accept that its requests wait.

    Raises:
        ValueError: not PostgreSQL, no `requests` table, or already partitioned.
    """
    store = RequestStore(location, create=False)
    try:
        if store.dialect != "postgresql":
            raise ValueError(f"{describe(location)} is not PostgreSQL: only PostgreSQL logs are partitioned")
        if not store.has_table():
            raise ValueError(f"{describe(location)} has no requests table")
        if is_partitioned(store.engine):
            raise ValueError(f"{describe(location)}: requests is already partitioned")
        store.create_schema()  # columns added by later releases, so the copy is column for column
        names = ", ".join(f'"{c.name}"' for c in requests_table.columns)
        new = partitioned_table("requests_partitioned")
        with store.engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE requests IN EXCLUSIVE MODE")
            low, high, top = conn.exec_driver_sql("SELECT min(ts), max(ts), max(id) FROM requests").one()
            new.create(conn)
            conn.exec_driver_sql(f'CREATE TABLE "{DEFAULT}" PARTITION OF requests_partitioned DEFAULT')
            now = time.time()
            ts = min(low if low is not None else now, now)
            last = max(high if high is not None else now, now + 31 * 86_400)
            while True:
                suffix, start, end = month_bounds(ts)
                conn.exec_driver_sql(f'CREATE TABLE "requests_{suffix}" PARTITION OF requests_partitioned '
                                     f'FOR VALUES FROM ({start!r}) TO ({end!r})')
                if end > last:
                    break
                ts = end
            moved = conn.exec_driver_sql(f"INSERT INTO requests_partitioned ({names}) "  # noqa: S608 - column names
                                         f"SELECT {names} FROM requests").rowcount
            conn.exec_driver_sql("DROP TABLE requests")
            conn.exec_driver_sql("ALTER TABLE requests_partitioned RENAME TO requests")
            if top is not None:
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('requests', 'id'), {int(top)})")
        return moved
    finally:
        store.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.partitions", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    migrate_parser = sub.add_parser("migrate", help="partition an existing unpartitioned PostgreSQL request log")
    migrate_parser.add_argument("url", help="the log's URL, e.g. postgresql://user@host/db")
    args = parser.parse_args(argv)
    try:
        moved = migrate(args.url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{describe(args.url)}: requests is partitioned by month; {moved} rows moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
