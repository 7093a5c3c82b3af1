"""/invocations against MLflow's own code: its scoring client over HTTP, and its scoring function
(`mlflow.pyfunc.scoring_server.invocations`) given the same bodies and the same registered model.

The one difference in what is answered: MLflow's pyfunc of the logged forest predicts class labels
(`RandomForestClassifier.predict`, the argmax class, i.e. a cut at 0.5), /invocations answers the
fraud probability. So where both answer, a label is 1 exactly when the probability is above 0.5.
The differences in what is accepted are listed in FORMS, each with its reason.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pandas as pd
import pytest
import requests
from werkzeug.serving import make_server

from common.model import PARITY_TOLERANCE
from common.schema import FEATURES
from common.store import RequestStore
from tests.helpers.service import AUTH, TOKEN

JSON, CSV, PARQUET = "application/json", "text/csv", "application/vnd.apache.parquet"
N_ROWS = 6


@pytest.fixture(scope="module")
def table(reference_data, pyfunc) -> pd.DataFrame:
    """Six rows of the reference data, in FEATURES order: the forest's surest fraud and surest
    legitimate row, and the two rows closest to 0.5 on each side of it (but clear of it), where a
    label and a probability most easily disagree."""
    frame = RequestStore(str(reference_data.db), create=False).read_frame(FEATURES)
    p = pd.Series(pyfunc.get_raw_model().predict_proba(frame)[:, 1], index=frame.index)
    above, below = p[p > 0.5 + 0.01].sort_values(), p[p < 0.5 - 0.01].sort_values()
    chosen = [p.idxmax(), *above.index[:2], *below.index[-2:], p.idxmin()]
    return frame.loc[chosen].reset_index(drop=True)


@pytest.fixture
def protocol_app(make_app):
    """The service with MAX_ROWS = N_ROWS, so that one more row is over the limit."""
    return make_app(max_rows=N_ROWS)


@pytest.fixture(scope="module")
def pyfunc(serving_registry):
    """MLflow's pyfunc of the version the service serves (version 1, Production)."""
    import mlflow

    from common.registry import use_tracking

    with use_tracking(serving_registry.store.tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{serving_registry.name}/1")


# --- MLflow's scoring client --------------------------------------------------------------------------


@pytest.fixture
def served(protocol_app) -> Iterator[int]:
    """The app behind a real HTTP server on a free loopback port."""
    server = make_server("127.0.0.1", 0, protocol_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_mlflows_scoring_client_waits_on_ping_and_invokes_with_a_dataframe_an_ndarray_and_params(
        served, table, protocol_app, monkeypatch):
    from mlflow.pyfunc.scoring_server import client as scoring_client

    client = scoring_client.ScoringServerClient("127.0.0.1", served)
    client.wait_server_ready(timeout=10)  # GET /ping, which needs no token
    with pytest.raises(Exception, match="error code 401"):
        client.invoke(table)
    # The client sends through the module-level `requests.post` and takes no headers. A Session
    # with the token has the same `post` and `get`; monkeypatch fails if the name ever goes away.
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    monkeypatch.setattr(scoring_client, "requests", session)
    expected = protocol_app.test_client().post(
        "/predict", json={"data": table.to_numpy().tolist()}, headers=AUTH).get_json()["fraud_probability"]
    for data, params in ((table, None), (table.to_numpy(), None), (table, {"anything": 1})):
        predictions = client.invoke(data, params=params).get_predictions(predictions_format="ndarray")
        np.testing.assert_allclose(predictions, expected, rtol=0, atol=1e-12)


# --- side by side with MLflow's scoring function ------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One body, and the status /invocations and MLflow's `invocations()` answer it with."""

    name: str
    content_type: str
    body: object  # a function of the table, returning bytes
    ours: int
    mlflow: int
    why: str = ""  # for a form the two treat differently


def json_body(payload) -> object:
    return lambda t: orjson.dumps(payload(t), option=orjson.OPT_SERIALIZE_NUMPY)


def records(t: pd.DataFrame) -> list[dict]:
    return t.to_dict(orient="records")


def split(t: pd.DataFrame) -> dict:
    return t.to_dict(orient="split")


def columns(t: pd.DataFrame) -> dict:
    return t.to_dict(orient="list")


def with_raw_amount(t: pd.DataFrame) -> pd.DataFrame:
    return t.drop(columns="Amount_scaled").assign(Amount=42.0)


def parquet(t: pd.DataFrame, **kwargs) -> bytes:
    return t.to_parquet(**kwargs)


REVERSED = list(reversed(FEATURES))
FORMS = [
    # The protocol's forms: both score them.
    Form("dataframe_split (pandas orient='split')", JSON, json_body(lambda t: {"dataframe_split": split(t)}), 200, 200),
    Form("dataframe_split, columns in another order", JSON,
         json_body(lambda t: {"dataframe_split": split(t[REVERSED])}), 200, 200),
    Form("dataframe_records", JSON, json_body(lambda t: {"dataframe_records": records(t)}), 200, 200),
    Form("instances as records", JSON, json_body(lambda t: {"instances": records(t)}), 200, 200),
    Form("inputs as records", JSON, json_body(lambda t: {"inputs": records(t)}), 200, 200),
    Form("inputs as columns (orient='list')", JSON, json_body(lambda t: {"inputs": columns(t)}), 200, 200),
    Form("instances as columns", JSON, json_body(lambda t: {"instances": columns(t)}), 200, 200),
    Form("inputs as one number per column (one row)", JSON, json_body(lambda t: {"inputs": records(t)[0]}), 200, 200),
    Form("params: an object", JSON, json_body(lambda t: {"inputs": records(t), "params": {"k": 1}}), 200, 200),
    Form("params: null", JSON, json_body(lambda t: {"inputs": records(t), "params": None}), 200, 200),
    Form("text/csv with a header row", CSV, lambda t: t.to_csv(index=False).encode(), 200, 200),
    Form("text/csv, columns in another order", CSV, lambda t: t[REVERSED].to_csv(index=False).encode(), 200, 200),
    Form("text/csv; charset=utf-8", f"{CSV}; charset=utf-8", lambda t: t.to_csv(index=False).encode(), 200, 200),
    Form("Parquet (to_parquet())", PARQUET, parquet, 200, 200),
    Form("Parquet with a stored index", PARQUET, lambda t: parquet(t.set_index(t.index + 10)), 200, 200),
    # What neither takes.
    Form("two input fields", JSON, json_body(lambda t: {"inputs": records(t), "instances": records(t)}), 400, 400),
    Form("no input field", JSON, json_body(lambda t: {"params": {}}), 400, 400),
    Form("a JSON array", JSON, json_body(records), 400, 400),
    Form("not JSON", JSON, lambda t: b"{", 400, 400),
    Form("empty JSON body", JSON, lambda t: b"", 400, 400),
    Form("a column missing", JSON, json_body(lambda t: {"dataframe_records": records(t.drop(columns="V3"))}),
         400, 400),
    Form("a string that is no number", JSON,
         json_body(lambda t: {"dataframe_records": records(t.astype(object).assign(V3="abc"))}), 400, 400),
    Form("columns of different lengths", JSON, json_body(lambda t: {"inputs": {**columns(t), "V3": [1.0]}}),
         400, 400),
    Form("text/csv without a header row", CSV, lambda t: t.to_csv(index=False, header=False).encode(), 400, 400),
    Form("text/csv, header only", CSV, lambda t: t.head(0).to_csv(index=False).encode(), 400, 400),
    Form("text/csv, empty", CSV, lambda t: b"", 400, 400),
    Form("Parquet that is not Parquet", PARQUET, lambda t: b"PAR1", 400, 400),
    Form("text/plain", "text/plain", json_body(lambda t: {"inputs": records(t)}), 415, 415),
    Form("application/octet-stream", "application/octet-stream", parquet, 415, 415),
    Form("charset=latin-1", f"{JSON}; charset=latin-1", json_body(lambda t: {"inputs": records(t)}), 415, 415),
    Form("format=pandas-split (MLflow 1.x)", f"{JSON}; format=pandas-split",
         json_body(lambda t: {"inputs": records(t)}), 415, 415),
    # Taken here, refused by MLflow for this model.
    Form("instances as rows of 29 numbers", JSON, json_body(lambda t: {"instances": t.to_numpy().tolist()}), 200, 400,
         "the model's signature names its columns, so MLflow refuses unnamed ones; here rows are in FEATURES order"),
    Form("inputs as rows (what ScoringServerClient sends for an ndarray)", JSON,
         json_body(lambda t: {"inputs": t.to_numpy().tolist()}), 200, 400, "as above"),
    Form("dataframe_split without columns", JSON, json_body(lambda t: {"dataframe_split": {"data": split(t)["data"]}}),
         200, 400, "as above"),
    Form("raw Amount instead of Amount_scaled", CSV, lambda t: with_raw_amount(t).to_csv(index=False).encode(),
         200, 400, "scaled here with the stored feature config, as /predict does; MLflow misses Amount_scaled"),
    # Refused here, taken by MLflow: the service validates what it scores and logs.
    Form("an unknown top-level field", JSON, json_body(lambda t: {"inputs": records(t), "param": {}}), 400, 200,
         "MLflow ignores it; here a typo of 'params' is an error"),
    Form("params that are not an object", JSON, json_body(lambda t: {"inputs": records(t), "params": [1]}), 400, 200,
         "MLflow ignores them (its client sends only a dict)"),
    Form("an unknown column", JSON, json_body(lambda t: {"dataframe_records": records(t.assign(Time=1.0))}), 400, 200,
         "MLflow drops it"),
    Form("text/csv with the index column (to_csv())", CSV, lambda t: t.to_csv().encode(), 400, 200,
         "MLflow drops it as an unknown column; the message here says to_csv(index=False)"),
    Form("an empty CSV value (NaN)", CSV, lambda t: t.assign(V3=np.nan).to_csv(index=False).encode(), 400, 200,
         "MLflow scores NaN; only finite numbers are scored here"),
    Form("a null value", JSON, json_body(lambda t: {"dataframe_records": records(t.astype(object).assign(V3=None))}),
         400, 200, "as above"),
    Form("a boolean value", JSON, json_body(lambda t: {"dataframe_records": records(t.astype(object).assign(V3=True))}),
         400, 200, "MLflow reads it as 1.0"),
    Form("a number as a string", JSON,
         json_body(lambda t: {"dataframe_records": records(t.astype(object).assign(V3="1.5"))}), 400, 200,
         "MLflow converts it"),
    Form("a value beyond ±1e9", JSON, json_body(lambda t: {"dataframe_records": records(t.assign(V3=5e9))}), 400, 200,
         "outside the accepted range of every feature"),
    Form(f"MAX_ROWS + 1 rows (here {N_ROWS + 1})", JSON,
         json_body(lambda t: {"dataframe_records": records(pd.concat([t, t.head(1)]))}), 400, 200,
         "MLflow has no row limit"),
]


def mlflow_answer(pyfunc, content_type: str, body: bytes) -> tuple[int, object]:
    """(status, predictions or None) from MLflow's own scoring function, as its server answers."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    try:
        result = invocations(body, content_type, pyfunc, pyfunc.metadata.get_input_schema())
    except MlflowException as exc:
        return exc.get_http_status_code(), None
    predictions = orjson.loads(result.response)["predictions"] if result.status == 200 else None
    return result.status, predictions


@pytest.mark.parametrize("form", FORMS, ids=[f.name for f in FORMS])
def test_invocations_accept_and_refuse_like_mlflows_scoring_function(form, table, protocol_app, pyfunc):
    body = form.body(table)
    response = protocol_app.test_client().post("/invocations", data=body, content_type=form.content_type,
                                               headers=AUTH)
    mlflow_status, labels = mlflow_answer(pyfunc, form.content_type, body)
    assert (response.status_code, mlflow_status) == (form.ours, form.mlflow), response.get_data(as_text=True)
    if form.ours != 200:
        assert set(response.get_json()) == {"error"}  # the one error shape
    if response.status_code == mlflow_status == 200:
        probabilities = np.array(response.get_json()["predictions"])
        # The forest's argmax class is 1 exactly when the fraud probability is above 0.5; ONNX may
        # differ from the forest by PARITY_TOLERANCE, so rows that close to 0.5 prove nothing.
        clear = np.abs(probabilities - 0.5) > PARITY_TOLERANCE
        assert clear.any()
        np.testing.assert_array_equal(np.array(labels)[clear], (probabilities > 0.5)[clear].astype(int))


def test_the_probabilities_are_those_of_the_forest_mlflow_loads_and_its_labels_cut_them_at_one_half(
        table, protocol_app, pyfunc):
    body = orjson.dumps({"dataframe_split": split(table)})
    ours = protocol_app.test_client().post("/invocations", data=body, content_type=JSON, headers=AUTH).get_json()
    _, labels = mlflow_answer(pyfunc, JSON, body)
    forest = pyfunc.get_raw_model()
    np.testing.assert_allclose(ours["predictions"], forest.predict_proba(table)[:, 1], rtol=0, atol=PARITY_TOLERANCE)
    assert labels == forest.predict(table).tolist()
    assert set(labels) == {0, 1}, "the rows should take both classes"
