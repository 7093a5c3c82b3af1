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
        {"inputs": [record()]},
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
    ({"inputs": {"V1": [1.0]}}, "the columnar form is not accepted"),
    ({"inputs": [ROW], "params": []}, "'params' is an array; expected an object"),
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
