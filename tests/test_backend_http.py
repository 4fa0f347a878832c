"""The `http` backend against a real HTTP server on 127.0.0.1 (started and stopped per test).

The server plays a hosted painter that answers every prompt with the image it was sent (an
identity model), so codec paintings decode back to the maps they encode; it can be scripted
to fail, stall or answer garbage.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest

import vb_batch
from vb_batch.config import ConfigError, ModelConfig, load_config
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend, model_id, public_url
from vb_batch.tasks import get_task

TOKEN = "s3cr3t-token-4f9a"


class Painter:
    """State of one fake endpoint: scripted statuses, what it received, how many calls overlapped."""

    def __init__(self):
        self.script: list[int] = []  # statuses of the next requests; then `status`
        self.status = 200
        self.answer: bytes | None = None  # a fixed body for 200s instead of the echo
        self.reason: str | None = None  # the reason phrase of error answers (None: the standard one)
        self.error_body: bytes | None = None  # a JSON body for error answers (None: the standard HTML page)
        self.delay_s = 0.0
        self.stall_first_s = 0.0  # the first request sleeps this long (to trip the client's timeout)
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.paths: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()


@pytest.fixture
def painter():
    state = Painter()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append((dict(self.headers), body))
                state.paths.append(self.path)
                status = state.script.pop(0) if state.script else state.status
                stall = state.stall_first_s if len(state.requests) == 1 else 0.0
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay_s + stall)
                if status in (301, 302, 307, 308):
                    self.send_response(status)
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status != 200 and state.reason is None and state.error_body is None:
                    self.send_error(status)
                    return
                if status != 200:
                    error = state.error_body or b""
                    self.send_response(status, state.reason)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                answer = state.answer if state.answer is not None else json.dumps({"image": body["image"]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1/paint?api=v2"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def job(input_path, output_path, endpoint, tasks=("depth",), **model):
    return {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "encoding": "array"},
        "tasks": list(tasks),
        "model": {
            "backend": "http", "endpoint": endpoint, "token_env": "PAINTER_TOKEN", "batch_size": 4,
            "retry_backoff_s": 0.01, **model,
        },
        "run": {"progress": False},
    }


def assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in str(text)


@pytest.fixture(autouse=True)
def token(monkeypatch, caplog):
    monkeypatch.setenv("PAINTER_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)  # everything any logger says is checked for the token


def test_paintings_from_the_endpoint_decode_to_the_painted_maps(painted_table, painter, tmp_path, caplog, capsys):
    paths, truth = painted_table
    painter.delay_s = 0.05  # long enough for requests to overlap
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "out", painter.url, concurrency=2, options={"quality": "hd"}))
    assert summary.success and summary.rows_ok == len(truth["depth"]), summary.render()
    table = read_output(str(tmp_path / "out"))
    for row_id, values in zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "depth")):
        np.testing.assert_allclose(values, truth["depth"][row_id], rtol=0.02)
    assert len(painter.requests) == len(truth["depth"])
    for headers, body in painter.requests:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert set(body) == {"prompt", "image", "quality"} and body["prompt"] == get_task("depth").default_template
    assert painter.max_in_flight == 2  # bounded: concurrency, not batch size
    # Provenance shows the endpoint without its query string; the token is nowhere.
    assert set(table.column("vb_model").to_pylist()) == {model_id(ModelConfig(backend="http", endpoint=painter.url))}
    assert "?api" not in table.column("vb_model")[0].as_py()
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err, table.schema.metadata, table.to_pylist())


def test_503_twice_then_200_is_retried(painted_table, painter, tmp_path, caplog, capsys):
    paths, truth = painted_table
    one_row = pq.read_table(paths["normals"]).slice(0, 1)
    pq.write_table(one_row, tmp_path / "one.parquet")
    painter.script = [503, 503]
    summary = vb_batch.annotate(job(tmp_path / "one.parquet", tmp_path / "out", painter.url, tasks=["normals"]))
    assert summary.rows_ok == 1 and summary.rows_failed == 0, summary.render()
    assert len(painter.requests) == 3
    (normals,) = vb_batch.load_arrays(read_output(str(tmp_path / "out")), "normals")
    expected = truth["normals"][one_row.column("id")[0].as_py()]
    assert np.degrees(np.arccos(np.clip(np.sum(normals * expected, axis=-1), -1, 1))).max() < 1.0
    assert "HTTP 503" in caplog.text and "retry 2/4" in caplog.text
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err)


@pytest.mark.parametrize(
    "status, attempts, code",
    [
        (503, 3, "model_http_error"),
        (429, 3, "model_http_error"),
        (400, 1, "model_http_error"),
        (307, 1, "model_http_error"),  # redirects are refused: the token would follow them
        ("garbage", 1, "model_bad_answer"),
    ],
)
def test_an_endpoint_that_keeps_failing_gives_row_errors(painted_table, painter, tmp_path, caplog, capsys, status, attempts, code):
    paths, truth = painted_table
    if status == "garbage":
        painter.answer = b'{"image": "not base64 at all!"}'
    else:
        painter.status = status
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "out", painter.url, max_retries=2))
    rows = len(truth["depth"])
    assert summary.rows_ok == 0 and summary.rows_failed == rows  # the job finished; every row says why
    assert len(painter.requests) == rows * attempts  # 3xx, 4xx (but 429) and bad answers are not retried
    assert "/elsewhere" not in painter.paths
    table = read_output(str(tmp_path / "out"))
    errors = table.column("vb_error").to_pylist()
    assert {e["code"] for e in errors} == {code}
    assert table.column("depth").null_count == rows
    if code == "model_http_error":
        assert all(f"HTTP {status}" in e["message"] and f"after {attempts} attempt(s)" in e["message"] for e in errors)
        assert all("?api" not in e["message"] for e in errors)
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err, errors)


def test_timeouts_and_refused_connections_are_retried(painted_table, painter, tmp_path):
    paths, truth = painted_table
    painter.stall_first_s = 1.0
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "slow", painter.url, timeout_s=0.3, concurrency=1))
    assert summary.rows_ok == len(truth["depth"]), summary.render()
    assert len(painter.requests) == len(truth["depth"]) + 1  # the stalled call, then its retry

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "refused", f"http://127.0.0.1:{closed_port}/", max_retries=1))
    assert summary.rows_failed == len(truth["depth"])
    errors = read_output(str(tmp_path / "refused")).column("vb_error").to_pylist()
    assert all(e["code"] == "model_http_error" and "after 2 attempt(s)" in e["message"] for e in errors)


def test_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"^model\.endpoint: "):
        create_backend(ModelConfig(backend="http"))
    monkeypatch.delenv("PAINTER_TOKEN")
    with pytest.raises(ConfigError, match=r"^model\.token_env: .*'PAINTER_TOKEN'"):
        create_backend(ModelConfig(backend="http", endpoint="http://127.0.0.1:9/", token_env="PAINTER_TOKEN"))
    for bad in ({"headers": {"Authorization": "Bearer x"}}, {"endpoint": "https://user:pw@host/x"}, {"endpoint": "ftp://h/x"}):
        with pytest.raises(ConfigError, match=rf"model\.{next(iter(bad))}: "):
            load_config({"input": {"path": "x"}, "model": {"backend": "http", **bad}})


def test_backend_pickles_without_its_token_in_repr(painter):
    import pickle

    backend = create_backend(ModelConfig(backend="http", endpoint=painter.url, token_env="PAINTER_TOKEN"))
    assert_no_token(repr(backend))
    clone = pickle.loads(pickle.dumps(backend))  # engines ship backends to workers
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    (answer,) = clone.predict([image], ["paint"], "depth", [0])
    np.testing.assert_array_equal(answer, image)


def test_what_a_server_says_reaches_row_errors_with_every_secret_masked(painted_table, painter, tmp_path, caplog, capsys):
    """A server that echoes the token, a header value and the endpoint's key back in its reason phrase and body."""
    paths, truth = painted_table
    team, key = "team-77aa0c", "qk-1f0e3b"
    echo = f"token {TOKEN} (Bearer%20{TOKEN}) team {team} key={key}"
    painter.script = [503]  # the first call is retried: its words go to a log line
    painter.status = 400
    painter.reason = f"Rejected {echo}"
    painter.error_body = json.dumps({"error": {"message": f"{echo}: prompt refused"}}).encode()
    summary = vb_batch.annotate(
        job(paths["depth"], tmp_path / "out", f"{painter.url}&key={key}", max_retries=1, headers={"X-Team": team})
    )
    assert summary.rows_failed == len(truth["depth"])
    headers, _ = painter.requests[0]
    assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["X-Team"] == team  # the secrets were sent
    assert painter.paths[0].endswith(f"&key={key}")
    table = read_output(str(tmp_path / "out"))
    errors = table.column("vb_error").to_pylist()
    for error in errors:  # the server's own words are kept, its echo of the secrets is not
        assert error["message"].startswith(f"{public_url(painter.url)}: HTTP 400 Rejected token *** (***) team *** key=***")
        assert "prompt refused" in error["message"]
    assert "HTTP 503 Rejected token ***" in caplog.text and "retry 1/1" in caplog.text
    out, err = capsys.readouterr()
    texts = [caplog.text, out, err, errors, table.schema.metadata, (tmp_path / "out" / "_report.html").read_text()]
    for secret in (TOKEN, team, key):
        for text in texts:
            assert secret not in str(text)


def test_header_values_that_would_break_a_request_are_refused_without_being_shown():
    for headers, why in (
        ({"X-Team": "a\r\nX-Injected: s3cr3t-hv"}, "line break"),
        ({"X-Goog-Api-Key": "s3cr3t-hv"}, "credential"),
        ({"X Team": "s3cr3t-hv"}, "not an HTTP header name"),
        ({"X-Team": "s3cr3t-hv\u2028"}, "not Latin-1"),
    ):
        with pytest.raises(ConfigError, match=rf"model\.headers: .*{why}") as caught:
            load_config({"input": {"path": "x"}, "model": {"backend": "http", "headers": headers}})
        assert "s3cr3t-hv" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"model\.endpoint: must be an http") as caught:
        load_config({"input": {"path": "x"}, "model": {"backend": "http", "endpoint": "ftp://h/x?key=s3cr3t-q"}})
    assert "s3cr3t-q" not in str(caught.value)
