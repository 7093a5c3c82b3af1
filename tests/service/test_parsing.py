"""The pure parsing layer: bodies to feature arrays, with precise messages for every mistake."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from common.features import AmountScaler
from common.schema import FEATURES
from service import parsing
from service.errors import ApiError

SCALER = AmountScaler(mean=88.0, std=250.0)
ROW = [float(i) / 10 for i in range(29)]


def scaler():
    return SCALER


def record(row=ROW, amount_key="Amount_scaled"):
    names = [*FEATURES[:-1], amount_key]
    return dict(zip(names, row, strict=True))


def predict(payload, max_rows=100):
    return parsing.predict_batch(payload, max_rows=max_rows, scaler=scaler)


def rejected(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    return info.value


def test_data_rows_become_a_float_array_in_feature_order():
    batch = predict({"data": [ROW, [1] * 29]})
    assert batch.X.dtype == np.float64 and batch.X.shape == (2, 29)
    assert batch.X[0].tolist() == ROW and batch.amount is None


def test_records_in_any_key_order_equal_the_positional_rows():
    shuffled = dict(reversed(list(record().items())))
    assert predict({"records": [shuffled]}).X.tolist() == [ROW]


def test_raw_amount_is_scaled_with_the_stored_feature_config_and_kept():
    batch = predict({"records": [record([*ROW[:28], 338.0], "Amount"), record()]})
    assert batch.X[0, 28] == pytest.approx((338.0 - 88.0) / 250.0)
    assert batch.X[1, 28] == ROW[28]
    assert batch.amount[0] == 338.0 and math.isnan(batch.amount[1])


@pytest.mark.parametrize(("payload", "message"), [
    ({"data": [ROW, ROW, ROW, ROW[:28]]}, "row 3 has 28 values, expected 29"),
    ({"data": [[*ROW, 1.0]]}, "row 0 has 30 values, expected 29"),
    ({"data": [[]]}, "row 0 has 0 values, expected 29"),
    ({"data": []}, "'data' is empty; send at least one row"),
    ({"data": ROW}, "row 0 of 'data' is the number 0.0, expected an array of 29 numbers"),
    ({"data": "rows"}, "'data' is a string; expected an array of rows of 29 numbers"),
    ({"data": [[*ROW[:5], "1.5", *ROW[6:]]]}, "row 0, value 5 (V6) is a string, expected a number"),
    ({"data": [[*ROW[:28], True]]}, "row 0, value 28 (Amount_scaled) is true (a boolean), expected a number"),
    ({"data": [[None, *ROW[1:]]]}, "row 0, value 0 (V1) is null, expected a number"),
    ({"data": [[[1.0], *ROW[1:]]]}, "row 0, value 0 (V1) is an array, expected a number"),
    ({"data": [[1e10, *ROW[1:]]]}, "row 0, value 0 (V1) is 1e+10, outside the accepted range [-1e+09, 1e+09]"),
    ({"data": [ROW], "records": [record()]}, "give either 'data' or 'records', not both"),
    ({"rows": [ROW]}, "the body has unknown field 'rows'; expected 'data', 'records'"),
    ({}, "the body has no 'data' (rows of 29 numbers) and no 'records'"),
    ([ROW], "the body is an array; expected a JSON object with 'data'"),
    ({"records": [{"V1": 1.0}]}, "record 0 is missing 'V2', 'V3', 'V4', 'V5', 'V6' and 22 more"),
    ({"records": [record(), {**record(), "Amount": 3.0}]}, "record 1 gives both 'Amount' and 'Amount_scaled'"),
    ({"records": [{k: v for k, v in record().items() if k != "Amount_scaled"}]},
     "record 0 is missing 'Amount_scaled' (or the raw 'Amount')"),
    ({"records": [{**record(), "Time": 1.0}]}, "record 0 has unknown field 'Time'"),
    ({"records": [{**record(), "V7": "x"}]}, "record 0 field 'V7' is a string, expected a number"),
    ({"records": [record([*ROW[:28], -2e9], "Amount")]}, "record 0 field 'Amount' is -2e+09, outside"),
    ({"records": [ROW]}, "record 0 is an array, expected an object keyed by feature name"),
])
def test_bad_predict_bodies_are_rejected_with_a_message_naming_the_problem(payload, message):
    error = rejected(predict, payload)
    assert error.status == 400 and error.code == "invalid_input"
    assert message in error.message


def test_more_rows_than_max_rows_are_rejected():
    error = rejected(predict, {"data": [ROW] * 11}, max_rows=10)
    assert (error.status, error.code) == (400, "too_many_rows")
    assert error.message == "'data' has 11 rows; at most 10 (MAX_ROWS) are accepted per request"


@pytest.mark.parametrize(("body", "fragment"), [
    (b'{"data": [[NaN]]}', "NaN and Infinity are not JSON numbers"),
    (b'{"data": [[-Infinity]]}', "NaN and Infinity are not JSON numbers"),
    (b'{"data": [[1e999]]}', "too large to be finite"),
    (b'{"data": [[1,]]}', "the body is not valid JSON"),
    (b'\xff\xfe', "the body is not valid JSON"),
    (b"", "the request body is empty"),
    (b"[" * 5000, "the body is not valid JSON"),
])
def test_bodies_that_are_not_strict_json_are_malformed(body, fragment):
    error = rejected(parsing.parse_json, body)
    assert (error.status, error.code) == (400, "malformed_json")
    assert fragment in error.message


def test_the_raw_amount_needs_the_feature_config():
    def missing():
        raise ApiError("feature_config_unavailable", "no config")

    error = rejected(parsing.predict_batch, {"records": [record(amount_key="Amount")]}, max_rows=5, scaler=missing)
    assert error.status == 503
    # Amount_scaled needs no config at all.
    assert parsing.predict_batch({"records": [record()]}, max_rows=5, scaler=missing).X.shape == (1, 29)


# --- MLflow scoring protocol ---------------------------------------------------------------------------


def invocations(payload, max_rows=100):
    return parsing.invocations_batch(payload, max_rows=max_rows, scaler=scaler)


def columns(rows=(ROW,), amount_key="Amount_scaled"):
    """pandas' `to_dict(orient="list")`: {column: [value per row]}."""
    names = [*FEATURES[:-1], amount_key]
    return {name: [row[j] for row in rows] for j, name in enumerate(names)}


def test_every_mlflow_input_format_gives_the_same_rows():
    reordered = [*reversed(FEATURES)]
    by_name = dict(zip(FEATURES, ROW, strict=True))
    formats = [
        {"dataframe_split": {"columns": list(FEATURES), "data": [ROW]}},
        {"dataframe_split": {"columns": reordered, "data": [[by_name[c] for c in reordered]], "index": [0]}},
        {"dataframe_split": {"data": [ROW]}},
        {"dataframe_records": [record()]},
        {"instances": [ROW]},
        {"instances": [record()]},
        {"inputs": [ROW], "params": {}},
        {"inputs": [ROW], "params": None},
        {"inputs": [record()]},
        {"inputs": {name: [value] for name, value in record().items()}},
        {"instances": dict(reversed(list({name: [value] for name, value in record().items()}.items())))},
        {"inputs": record()},
    ]
    for payload in formats:
        assert invocations(payload).X.tolist() == [ROW], payload


def test_mlflow_split_format_scales_a_raw_amount_column():
    columns = [*FEATURES[:-1], "Amount"]
    batch = invocations({"dataframe_split": {"columns": columns, "data": [[*ROW[:28], 88.0]]}})
    assert batch.X[0, 28] == 0.0 and batch.amount.tolist() == [88.0]


@pytest.mark.parametrize(("payload", "message"), [
    ({}, "give exactly one of 'dataframe_split', 'dataframe_records', 'instances', 'inputs'; got none"),
    ({"instances": [ROW], "inputs": [ROW]}, "got 'instances', 'inputs'"),
    ({"inputs": {"V1": [1.0]}}, "'inputs' is missing 'V2', 'V3'"),
    ({"inputs": {**columns(), "V3": [1.0, 2.0]}}, "'inputs' column 'V3' has 2 values and column 'V1' 1"),
    ({"inputs": {**columns(), "V3": 1.0}}, "'inputs' column 'V3' is the number 1.0 where the others are arrays"),
    ({"inputs": {**columns(), "V3": ["1.0"]}}, "'inputs' column 'V3' value 0 is a string, expected a number"),
    ({"inputs": {**columns(), "V3": [None]}}, "'inputs' column 'V3' value 0 is null"),
    ({"inputs": {**columns(), "V3": [2e9]}}, "'inputs' column 'V3' value 0 is 2e+09, outside the accepted range"),
    ({"inputs": {**columns(), "Time": [1.0]}}, "'inputs' has unknown column 'Time'"),
    ({"inputs": {name: [] for name in FEATURES}}, "'inputs.V1' is empty"),
    ({"inputs": {**record(), "V3": "x"}}, "record 0 field 'V3' is a string"),
    ({"inputs": [ROW], "params": []}, "'params' is an array; expected an object or null"),
    ({"inputs": [ROW], "params": "x"}, "'params' is a string; expected an object or null"),
    ({"dataframe_split": {"columns": list(FEATURES)}}, "'dataframe_split' has no 'data'"),
    ({"dataframe_split": {"columns": [*FEATURES[:-1], "V1"], "data": [ROW]}},
     "dataframe_split.columns names 'V1' more than once"),
    ({"dataframe_split": {"columns": [*FEATURES[:-1], "Time"], "data": [ROW]}}, "unknown column 'Time'"),
    ({"dataframe_split": {"columns": list(FEATURES[1:]), "data": [ROW[1:]]}}, "is missing 'V1'"),
    ({"dataframe_split": {"columns": list(FEATURES), "data": [ROW[:3]]}}, "row 0 has 3 values, expected 29"),
    ({"dataframe_records": [record(), ROW]}, "record 1 is an array"),
    ({"instances": [ROW, record()]}, "row 1 of 'instances' is an object"),
    ({"instances": []}, "'instances' is empty"),
])
def test_bad_mlflow_bodies_are_rejected_with_a_message_naming_the_problem(payload, message):
    error = rejected(invocations, payload)
    assert error.status == 400
    assert message in error.message


def test_the_columnar_form_gives_the_rows_and_scales_a_raw_amount_column():
    rows = [ROW, [*ROW[:28], 338.0]]
    assert invocations({"inputs": columns(rows)}).X.tolist() == rows
    batch = invocations({"instances": columns(rows, "Amount")})
    assert batch.X[:, 28] == pytest.approx([(ROW[28] - 88.0) / 250.0, 1.0])
    assert batch.amount.tolist() == [ROW[28], 338.0]


def test_every_mlflow_form_keeps_max_rows():
    rows = [ROW] * 11
    for payload in ({"dataframe_split": {"columns": list(FEATURES), "data": rows}},
                    {"dataframe_records": [record()] * 11}, {"instances": rows}, {"inputs": columns(rows)}):
        error = rejected(invocations, payload, max_rows=10)
        assert (error.status, error.code) == (400, "too_many_rows"), payload
    for media_type, body in ((parsing.CSV, csv_body(rows)), (parsing.PARQUET, parquet_body(rows))):
        error = rejected(parsing.invocations_body, media_type, body, max_rows=10, scaler=scaler)
        assert (error.status, error.code) == (400, "too_many_rows"), media_type
        assert parsing.invocations_body(media_type, body, max_rows=11, scaler=scaler).X.tolist() == rows


@pytest.mark.parametrize(("mimetype", "params", "fragment"), [
    ("text/plain", {}, "Content-Type is text/plain; send one of application/json, text/csv, "
                       "application/vnd.apache.parquet"),
    ("", {}, "Content-Type is none"),
    ("application/json", {"format": "pandas-split"}, "the Content-Type parameter 'format' is not accepted"),
    ("text/csv", {"charset": "latin-1"}, "charset latin-1 is not accepted"),
    ("application/octet-stream", {}, "Content-Type is application/octet-stream"),
])
def test_invocations_take_mlflows_three_media_types_in_utf8_only(mimetype, params, fragment):
    error = rejected(parsing.invocations_media_type, mimetype, params)
    assert (error.status, error.code) == (415, "unsupported_media_type")
    assert fragment in error.message


def test_invocations_media_types_with_a_utf8_charset_are_accepted():
    for mimetype in parsing.INVOCATION_MEDIA_TYPES:
        assert parsing.invocations_media_type(mimetype, {}) == mimetype
        assert parsing.invocations_media_type(mimetype, {"charset": "UTF-8"}) == mimetype


# --- CSV and Parquet ----------------------------------------------------------------------------------


def frame(rows=(ROW,), amount_key="Amount_scaled"):
    import pandas as pd

    return pd.DataFrame(list(rows), columns=[*FEATURES[:-1], amount_key])


def csv_body(rows=(ROW,), amount_key="Amount_scaled") -> bytes:
    return frame(rows, amount_key).to_csv(index=False).encode()


def parquet_body(rows=(ROW,), amount_key="Amount_scaled", **kwargs) -> bytes:
    return frame(rows, amount_key).to_parquet(**kwargs)


def csv_batch(body, max_rows=100):
    return parsing.csv_batch(body if isinstance(body, bytes) else body.encode(), max_rows=max_rows, scaler=scaler)


def parquet_batch(body, max_rows=100):
    return parsing.parquet_batch(body, max_rows=max_rows, scaler=scaler)


def test_csv_and_parquet_tables_give_the_rows_exactly_in_any_column_order():
    rng = np.random.default_rng(1)
    rows = (rng.normal(size=(50, 29)) * 10.0 ** rng.integers(-8, 8, size=(50, 29))).tolist()
    reordered = frame(rows)[list(reversed(FEATURES))]
    for body in (csv_body(rows), reordered.to_csv(index=False).encode()):
        assert csv_batch(body).X.tolist() == rows
    for body in (parquet_body(rows), reordered.to_parquet(), reordered.set_index("V3", drop=False).to_parquet(),
                 frame(rows).astype(np.float32).to_parquet()):
        np.testing.assert_allclose(parquet_batch(body).X, rows, rtol=1e-6)
    assert parquet_batch(parquet_body(rows)).X.tolist() == rows
    assert parquet_batch(frame([[1] * 29]).astype(np.int64).to_parquet()).X.tolist() == [[1.0] * 29]


def test_csv_and_parquet_tables_scale_a_raw_amount_column():
    rows = [[*ROW[:28], 338.0]]
    for batch in (csv_batch(csv_body(rows, "Amount")), parquet_batch(parquet_body(rows, "Amount"))):
        assert batch.X[0, 28] == pytest.approx(1.0) and batch.amount.tolist() == [338.0]


HEADER = ",".join(FEATURES)
VALUES = ",".join(str(v) for v in ROW)


@pytest.mark.parametrize(("body", "message"), [
    ("", "the CSV body is empty; send a header row of column names"),
    (HEADER + "\n", "the CSV body has a header row but no rows"),
    (VALUES + "\n" + VALUES + "\n", "the first CSV row holds numbers, not column names"),
    ("," + HEADER + "\n0," + VALUES + "\n", "the first CSV column has no name: it looks like a DataFrame index"),
    (HEADER.replace("V3", "V1") + "\n" + VALUES, "the CSV header names 'V1' more than once"),
    (HEADER.replace("V3", "Time") + "\n" + VALUES, "the CSV header has unknown column 'Time'"),
    (HEADER.replace("V3,", "") + "\n" + VALUES, "the CSV header is missing 'V3'"),
    (HEADER + ",Amount\n" + VALUES + ",1", "the CSV header gives both 'Amount' and 'Amount_scaled'"),
    (",".join(["x"] * 31) + "\n", "the CSV header has more than 30 columns; expected 29"),
    (",".join(["V1"] * 1_000_000), "the CSV header has more than 30 columns; expected 29"),
    (HEADER + "\n" + VALUES + ",1.0\n", "the CSV rows have 30 values and the header names 29 columns"),
    (HEADER + "\n" + VALUES + "\n" + VALUES + ",1.0\n", "the body is not a CSV table: Error tokenizing data"),
    (HEADER + "\n" + VALUES + "\n" + VALUES.replace("0.2", "abc", 1) + "\n", "row 1 column 'V3' is 'abc'"),
    (HEADER + "\n" + VALUES.replace("0.2", "1_000", 1) + "\n", "row 0 column 'V3' is '1_000', expected a number"),
    (HEADER + "\n" + VALUES.replace("0.2", "True", 1) + "\n", "row 0 column 'V3' is 'True', expected a number"),
    (HEADER + "\n" + VALUES.replace("0.2", "", 1) + "\n", "row 0 column 'V3' is nan, expected a finite number"),
    (HEADER + "\n" + VALUES.replace("0.2", "NaN", 1) + "\n", "row 0 column 'V3' is nan, expected a finite number"),
    (HEADER + "\n" + VALUES.replace("0.2", "-inf", 1) + "\n", "row 0 column 'V3' is -inf, expected a finite"),
    (HEADER + "\n" + VALUES.replace("0.2", "3e9", 1) + "\n", "row 0 column 'V3' is 3e+09, outside the accepted"),
    (HEADER + "\n" + VALUES + "\n" + VALUES.rsplit(",", 1)[0] + "\n",
     "row 1 column 'Amount_scaled' is nan, expected a finite number"),
])
def test_bad_csv_bodies_are_refused_with_a_message_naming_the_problem(body, message):
    error = rejected(csv_batch, body)
    assert (error.status, error.code) == (400, "invalid_input")
    assert message in error.message


def test_csv_that_is_not_utf8_is_refused():
    error = rejected(csv_batch, (HEADER + "\n" + VALUES).encode("utf-16"))
    assert error.code == "invalid_input" and "the CSV body is not UTF-8" in error.message


def parquet_of(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def parquet_columns(**changes) -> dict:
    return {**{name: [value] for name, value in zip(FEATURES, ROW, strict=True)}, **changes}


@pytest.mark.parametrize(("body", "message"), [
    (b"", "the Parquet body is empty"),
    (b"PAR1 not really", "the body is not a Parquet file"),
    (lambda: csv_body(), "the body is not a Parquet file"),
    (lambda: parquet_of(parquet_columns(V3=["abc"])), "the Parquet column 'V3' is of type string, expected"),
    (lambda: parquet_of(parquet_columns(V3=[True])), "the Parquet column 'V3' is of type bool, expected"),
    (lambda: parquet_of(parquet_columns(V3=[None])), "the Parquet column 'V3' is of type null"),
    (lambda: parquet_of(parquet_columns(V3=[[1.0]])), "the Parquet column 'V3' is of type list<"),
    (lambda: parquet_of({name: [] for name in FEATURES}), "the Parquet table has no rows"),
    (lambda: parquet_of(parquet_columns(Time=[1.0])), "the Parquet table has unknown column 'Time'"),
    (lambda: parquet_of({k: v for k, v in parquet_columns().items() if k != "V3"}), "the Parquet table is missing"),
    (lambda: parquet_of(parquet_columns(V3=[float("nan")])), "row 0 column 'V3' is nan, expected a finite number"),
    (lambda: parquet_of(parquet_columns(V3=[5e9])), "row 0 column 'V3' is 5e+09, outside the accepted range"),
])
def test_bad_parquet_bodies_are_refused_with_a_message_naming_the_problem(body, message):
    error = rejected(parquet_batch, body() if callable(body) else body)
    assert (error.status, error.code) == (400, "invalid_input")
    assert message in error.message


def test_a_parquet_null_is_refused_with_its_row():
    import pyarrow as pa

    body = parquet_of({**{name: [0.0, 0.0] for name in FEATURES}, "V3": pa.array([0.5, None], pa.float64())})
    error = rejected(parquet_batch, body)
    assert error.message == "row 1 column 'V3' is null, expected a finite number"


@pytest.mark.parametrize("note", [b"{not json", b"[1]", b'{"index_columns": 7}', b'{"index_columns": [{"a": 1}]}'])
def test_a_malformed_pandas_note_in_a_parquet_file_is_ignored(note):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(parquet_columns()).replace_schema_metadata({b"pandas": note})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    assert parquet_batch(sink.getvalue().to_pybytes()).X.tolist() == [ROW]


def test_a_parquet_file_declaring_millions_of_rows_is_refused_from_its_footer():
    import pyarrow as pa

    # Ten million constant rows compress to a few kilobytes; decoding them all would take 2.3 GB.
    n = 10_000_000
    body = parquet_of({"V1": pa.array(np.full(n, 0.5))})
    assert len(body) < 100_000
    error = rejected(parquet_batch, body, max_rows=5000)
    assert error.code == "too_many_rows"
    assert error.message == "the Parquet table has 10000000 rows; at most 5000 (MAX_ROWS) are accepted per request"


# --- feedback --------------------------------------------------------------------------------------------


def test_feedback_labels_accept_booleans_and_zero_one_and_the_last_repeat_wins():
    labels = parsing.feedback_labels({"labels": [
        {"request_id": "a-0", "is_fraud": True}, {"request_id": "b-0", "is_fraud": 0},
        {"request_id": "a-0", "is_fraud": False}, {"request_id": "c-1", "is_fraud": 1.0},
    ]}, max_items=10)
    assert labels == {"a-0": 0, "b-0": 0, "c-1": 1}


@pytest.mark.parametrize(("payload", "message"), [
    ({"labels": [{"request_id": "a", "is_fraud": 2}]}, "label 0 'is_fraud' is the number 2; expected true, false"),
    ({"labels": [{"request_id": "a", "is_fraud": "yes"}]}, "'is_fraud' is a string"),
    ({"labels": [{"request_id": "", "is_fraud": True}]}, "'request_id' is a string; expected a string of 1 to 64"),
    ({"labels": [{"request_id": "x" * 65, "is_fraud": True}]}, "expected a string of 1 to 64"),
    ({"labels": [{"request_id": 7, "is_fraud": True}]}, "'request_id' is the number 7"),
    ({"labels": [{"request_id": "a", "is_fraud": True, "note": 1}]}, "label 0 has unknown field 'note'"),
    ({"labels": []}, "'labels' is empty"),
    ({"labels": ["a"]}, "label 0 is a string"),
    ({}, "the body has no 'labels'"),
])
def test_bad_feedback_is_rejected_with_a_message_naming_the_item(payload, message):
    error = rejected(parsing.feedback_labels, payload, max_items=10)
    assert error.status == 400 and message in error.message


def test_a_thousand_row_body_parses_to_the_same_numbers():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1000, 29))
    batch = parsing.predict_batch(parsing.parse_json(orjson.dumps({"data": rows.tolist()})), max_rows=5000,
                                  scaler=scaler)
    np.testing.assert_array_equal(batch.X, rows)
