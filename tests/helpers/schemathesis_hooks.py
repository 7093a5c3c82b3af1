"""schemathesis hooks for the service's OpenAPI document (loaded through SCHEMATHESIS_HOOKS by the
schemathesis run of tests/reliability/test_reliability_security.py).

/invocations takes text/csv and Parquet bodies, which the document describes as the table's records
(`Table`). schemathesis generates such records and cannot send them without a serializer for these
media types; the ones here write them as a client would (pandas' `to_csv(index=False)`, `to_parquet()`).
They are faithful both ways: schema-valid records give a table the service must accept, and anything
else gives a body it must refuse. A string is written with its JSON quotes, so "1.5" stays text
instead of reading back as the number 1.5; a value no table can hold gives bytes that are no table.

The columnar `inputs` form needs columns of equal length, which JSON Schema cannot state: a body
generated as valid gets its columns cut to the shortest, which keeps it valid.
"""

from __future__ import annotations

import csv
import io
import json

import schemathesis
from schemathesis.core.parameters import ParameterLocation


def _records(value: object) -> list[dict] | None:
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        return value
    return None


def _columns(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in records for key in row))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def _not_a_table(value: object) -> bytes:
    return json.dumps(value).encode()


@schemathesis.serializer("text/csv")
def csv_table(ctx, value) -> bytes:
    records = _records(value)
    if records is None:
        return _not_a_table(value)
    columns = _columns(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(name)) for name in columns] for row in records)
    return out.getvalue().encode()


@schemathesis.serializer("application/vnd.apache.parquet")
def parquet_table(ctx, value) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(value)
    if records is None:
        return _not_a_table(value)
    sink = pa.BufferOutputStream()
    try:
        table = pa.table({name: pa.array([row.get(name) for row in records]) for name in _columns(records)})
        pq.write_table(table, sink)
    except (pa.ArrowException, OverflowError):  # mixed, oversized or empty values: no Parquet column holds them
        return _not_a_table(value)
    return sink.getvalue().to_pybytes()


@schemathesis.hook
def map_case(context, case):
    body = case.body
    meta = case.meta
    if not isinstance(body, dict) or meta is None or meta.is_negative_at(ParameterLocation.BODY):
        return case
    for name in ("inputs", "instances"):
        columns = body.get(name)
        if isinstance(columns, dict) and columns and all(isinstance(v, list) for v in columns.values()):
            shortest = min(len(v) for v in columns.values())
            body[name] = {key: values[:shortest] for key, values in columns.items()}
    return case
