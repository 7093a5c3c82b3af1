"""Early answers and the request body they leave: read before the answer, or the connection closes.

Here on WSGI environs and real sockets; tests/service/test_serving_workers.py holds the same on a
real gunicorn with both workers.
"""

from __future__ import annotations

import io
import socket
import threading
import types

import pytest
from werkzeug.test import EnvironBuilder

from service import connection
from tests.helpers.service import AUTH, parse_metrics

LIMIT = 4096


@pytest.fixture
def gunicorn_request():
    """What gunicorn's pre_request hook hands over for this thread; forgotten afterwards."""
    request = types.SimpleNamespace(must_close=False)
    connection.serving(request)
    yield request
    connection.serving(None)


def environ(body: bytes | None = None, **kwargs) -> dict:
    return EnvironBuilder(method="POST", data=body, **kwargs).get_environ()


def test_a_request_without_a_body_leaves_nothing_to_do(gunicorn_request):
    assert connection.settle(environ(), 401, LIMIT) is None
    assert connection.settle(EnvironBuilder(method="GET").get_environ(), 404, LIMIT) is None
    assert gunicorn_request.must_close is False


def test_an_unread_body_within_the_limit_is_read_to_its_end_and_the_connection_stays(gunicorn_request):
    env = environ(b"x" * LIMIT)
    assert connection.settle(env, 401, LIMIT) == connection.DRAINED
    assert env["wsgi.input"].read() == b""
    assert gunicorn_request.must_close is False


def test_a_body_the_app_already_read_leaves_nothing_to_do(gunicorn_request):
    env = environ(b'{"data": 1}')
    env["wsgi.input"].read()
    assert connection.settle(env, 400, LIMIT) is None
    assert gunicorn_request.must_close is False


def test_a_body_declared_over_the_limit_is_not_read_and_the_connection_closes(gunicorn_request):
    env = environ(b"x" * (LIMIT + 1))
    assert connection.settle(env, 415, LIMIT) == connection.TOO_LARGE
    assert len(env["wsgi.input"].read()) == LIMIT + 1, "nothing of it was read"
    assert gunicorn_request.must_close is True


def test_a_chunked_body_that_runs_over_the_limit_closes_the_connection(gunicorn_request):
    env = environ(headers={"Transfer-Encoding": "chunked"})
    env["wsgi.input"] = io.BytesIO(b"x" * (LIMIT + 1))
    assert connection.settle(env, 401, LIMIT) == connection.TOO_LARGE
    assert gunicorn_request.must_close is True


@pytest.mark.parametrize(("status", "outcome"), [(413, connection.TOO_LARGE), (408, connection.TOO_SLOW)])
def test_a_refused_or_stalled_body_is_not_read_and_the_connection_closes(gunicorn_request, status, outcome):
    env = environ(b"x" * 10)
    assert connection.settle(env, status, LIMIT) == outcome
    assert env["wsgi.input"].read() == b"x" * 10
    assert gunicorn_request.must_close is True


def test_a_failed_read_closes_the_connection(gunicorn_request):
    class Reset(io.RawIOBase):
        def read(self, size=-1):
            raise ConnectionResetError("reset by peer")

    env = environ(b"x" * 10)
    env["wsgi.input"] = Reset()
    assert connection.settle(env, 401, LIMIT) == connection.FAILED
    assert gunicorn_request.must_close is True


def test_a_body_that_does_not_arrive_in_time_closes_the_connection_and_the_socket_keeps_its_timeout(
        gunicorn_request, monkeypatch):
    monkeypatch.setenv("CLIENT_TIMEOUT", "0.2")  # the drain waits at most this, when shorter than DRAIN_SECONDS
    server, client = socket.socketpair()
    with server, client, server.makefile("rb") as stream:
        server.settimeout(7.5)
        client.sendall(b"half")  # of the 100 bytes announced
        env = environ(b"x" * 100)
        env.update({"wsgi.input": stream, "gunicorn.socket": server})
        assert connection.settle(env, 401, LIMIT) == connection.TOO_SLOW
        assert server.gettimeout() == 7.5
    assert gunicorn_request.must_close is True


def test_close_after_response_reaches_only_the_request_of_its_own_thread(gunicorn_request):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(connection.close_after_response()))
    thread.start()
    thread.join()
    assert seen == [False] and gunicorn_request.must_close is False
    assert connection.close_after_response() is True and gunicorn_request.must_close is True


def test_outside_gunicorn_there_is_no_connection_to_close():
    connection.serving(None)
    assert connection.close_after_response() is False


# --- through the app ----------------------------------------------------------------------------------


def unread_bodies(client) -> dict[str, float]:
    samples = parse_metrics(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    return {labels[0][1]: value for (name, labels), value in samples.items() if name == "fraud_unread_bodies_total"}


def test_the_app_drains_what_its_early_answers_leave_and_counts_it(client, sample_rows):
    before = unread_bodies(client)
    assert client.post("/predict", json={"data": [sample_rows[0]]}, headers={"Authorization": "Bearer no"}
                       ).status_code == 401
    assert client.post("/predict", data="a,b", headers={**AUTH, "Content-Type": "text/csv"}).status_code == 415
    assert client.post("/nowhere", json={"data": []}).status_code == 404
    assert client.post("/health", json={"data": []}).status_code == 405
    # Answers that read their body leave nothing: a success, a malformed body.
    assert client.post("/predict", json={"data": [sample_rows[0]]}, headers=AUTH).status_code == 200
    assert client.post("/predict", data="{", headers={**AUTH, "Content-Type": "application/json"}).status_code == 400
    after = unread_bodies(client)
    assert after["drained"] - before["drained"] == 4
    assert all(after[outcome] == before[outcome] for outcome in ("too_large", "too_slow", "failed"))


def test_the_app_counts_a_body_over_the_limit_as_too_large(make_app):
    client = make_app(max_body_bytes=1024).test_client()
    before = unread_bodies(client)
    response = client.post("/predict", data=b"x" * 2048, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert unread_bodies(client)["too_large"] - before["too_large"] == 1
