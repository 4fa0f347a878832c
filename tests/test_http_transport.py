"""The one HTTP transport (`vb_batch.io.http`) and the one retry helper (`vb_batch.io.retry`), on real
loopback servers: the checked address is the one connected to while the host name is what TLS names and
verifies, nothing is followed, retried or decoded behind the caller's back, bodies and time are bounded."""

from __future__ import annotations

import gzip
import http.server
import logging
import socket
import ssl
import threading
import time

import pytest
from hostile_uris import self_signed_certificate

from vb_batch.errors import RowError
from vb_batch.io import http as transport
from vb_batch.io.http import (
    BodyTooLarge,
    CertificateRejected,
    ConnectFailed,
    DeadlinePassed,
    ReadTimedOut,
    Transport,
)
from vb_batch.io.retry import MAX_RETRY_AFTER_S, Failure, parse_retry_after, retry_delay, with_retries

LIMIT = 1 << 20


class ScriptedServer:
    """HTTP(S) on 127.0.0.1: answers from `script` (then 200 b"ok"), records each request and connection."""

    def __init__(self, tls: tuple | None = None):
        self.script: list[tuple[int, dict[str, str | None], bytes]] = []
        self.requests: list[tuple[str, str, dict[str, str], int]] = []  # method, path, headers, client port
        self.server_names: list[str | None] = []  # TLS SNI of each handshake
        self.stall_s = 0.0
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                state.requests.append((self.command, self.path, dict(self.headers), self.client_address[1]))
                status, headers, body = state.script.pop(0) if state.script else (200, {}, b"ok")
                time.sleep(state.stall_s)
                try:
                    self.send_response(status)
                    for name, value in {"Content-Length": str(len(body)), **headers}.items():
                        if value is not None:  # None: a header left out
                            self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server():
    with ScriptedServer() as running:
        yield running


def send(url: str, **kw):
    kw.setdefault("timeout_s", 5)
    kw.setdefault("max_body_bytes", LIMIT)
    return Transport().send(kw.pop("method", "GET"), url, **kw)


def test_it_connects_to_the_given_address_and_names_the_host(server):
    # images.test resolves nowhere: the answer can only come from the address given.
    answer = send(f"http://images.test:{server.port}/a%20b.png?x=1&sig=s", connect_to=["127.0.0.1"])
    assert (answer.status, answer.body) == (200, b"ok") and answer.ok
    method, path, headers, _ = server.requests[0]
    assert path == "/a%20b.png?x=1&sig=s"  # sent as given, not re-normalised
    assert headers["Host"] == f"images.test:{server.port}"


def test_the_next_address_is_tried_when_one_refuses(server):
    # 127.0.0.2 is loopback too, but nothing listens there on this port.
    assert send(f"http://images.test:{server.port}/", connect_to=["127.0.0.2", "127.0.0.1"]).ok
    with pytest.raises(ConnectFailed):
        send(f"http://images.test:{server.port}/", connect_to=["127.0.0.2"])
    assert len(server.requests) == 1


def test_tls_sends_and_verifies_the_host_name_at_the_checked_address(tmp_path, monkeypatch):
    cert, key = self_signed_certificate(tmp_path, "images.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust this certificate alone
    transport.tls_context.cache_clear()
    try:
        with ScriptedServer(tls=(cert, key)) as server:
            answer = send(f"https://images.test:{server.port}/x", connect_to=["127.0.0.1"])
            assert answer.body == b"ok" and server.server_names == ["images.test"]
            with pytest.raises(CertificateRejected, match="[Hh]ostname mismatch"):
                send(f"https://cdn.test:{server.port}/x", connect_to=["127.0.0.1"])
            assert server.server_names[-1] == "cdn.test" and len(server.requests) == 1
        transport.tls_context.cache_clear()
        monkeypatch.delenv("SSL_CERT_FILE")
        with ScriptedServer(tls=(cert, key)) as server, pytest.raises(CertificateRejected):
            send(f"https://images.test:{server.port}/x", connect_to=["127.0.0.1"])  # not trusted by the system
    finally:
        transport.tls_context.cache_clear()


def test_redirects_are_answers_not_followed(server):
    server.script = [(302, {"Location": "/elsewhere"}, b"")]
    answer = send(f"http://127.0.0.1:{server.port}/first")
    assert answer.status == 302 and answer.headers["location"] == "/elsewhere" and not answer.ok
    assert [path for _, path, _, _ in server.requests] == ["/first"]


def test_bodies_are_bounded(server):
    url = f"http://127.0.0.1:{server.port}/"
    server.script = [(200, {}, b"x" * 101)]
    with pytest.raises(BodyTooLarge) as declared:
        send(url, max_body_bytes=100)
    assert declared.value.size == 101
    chunked = b"65\r\n" + b"x" * 101 + b"\r\n0\r\n\r\n"  # 0x65 = 101 bytes, no Content-Length
    server.script = [(200, {"Content-Length": None, "Transfer-Encoding": "chunked"}, chunked)]
    with pytest.raises(BodyTooLarge) as streamed:
        send(url, max_body_bytes=100)
    assert streamed.value.size is None
    server.script = [(200, {}, b"x" * 100)]
    assert len(send(url, max_body_bytes=100).body) == 100
    server.script = [(500, {"Content-Type": "text/plain"}, b"e" * 5000)]
    assert send(url, error_body_bytes=10).body == b"e" * 10  # of an error, only what the caller wants


def test_bodies_are_the_bytes_sent_never_decoded(server):
    packed = gzip.compress(b"\0" * 1_000_000)  # 1 MB inflated, ~1 KB on the wire
    server.script = [(200, {"Content-Encoding": "gzip"}, packed)]
    assert send(f"http://127.0.0.1:{server.port}/", max_body_bytes=len(packed)).body == packed


def test_a_silent_server_times_out_and_a_dripping_one_meets_the_deadline(server):
    server.stall_s = 2.0
    start = time.monotonic()
    with pytest.raises(ReadTimedOut):
        send(f"http://127.0.0.1:{server.port}/", timeout_s=0.5)
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    with pytest.raises(DeadlinePassed):  # each wait is within timeout_s; the whole request is not
        send(f"http://127.0.0.1:{server.port}/", timeout_s=5, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - start < 1.5


def test_connections_are_kept_alive_unless_asked_not_to(server):
    client = Transport()
    url = f"http://127.0.0.1:{server.port}/"
    for headers in ({}, {}, {"Connection": "close"}, {}):
        assert client.send("GET", url, headers=headers, timeout_s=5, max_body_bytes=LIMIT).ok
    ports = [port for _, _, _, port in server.requests]
    assert ports[0] == ports[1] == ports[2] != ports[3]


def test_query_strings_stay_out_of_urllib3s_logs(server, caplog):
    caplog.set_level(logging.DEBUG)
    send(f"http://127.0.0.1:{server.port}/paint?key=s3cr3t-q")
    assert "/paint?***" in caplog.text and "s3cr3t-q" not in caplog.text


def test_env_proxies_are_used_only_when_asked_and_never_for_checked_addresses(server, monkeypatch):
    with ScriptedServer() as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "bypass.test")
        proxied = Transport(use_env_proxies=True)
        assert proxied.send("POST", "http://painter.test/v1", body=b"{}", timeout_s=5, max_body_bytes=LIMIT).ok
        assert proxy.requests[-1][:2] == ("POST", "http://painter.test/v1")  # the absolute form a proxy is sent
        url = f"http://painter.test:{server.port}/v1"
        assert proxied.send("GET", url, connect_to=["127.0.0.1"], timeout_s=5, max_body_bytes=LIMIT).ok
        assert Transport().send("GET", url, connect_to=["127.0.0.1"], timeout_s=5, max_body_bytes=LIMIT).ok
        with pytest.raises(ConnectFailed):  # bypassed: resolved here, and bypass.test resolves nowhere
            proxied.send("GET", "http://bypass.test/v1", timeout_s=5, max_body_bytes=LIMIT)
    assert len(proxy.requests) == 1 and len(server.requests) == 2


# ---------------------------------------------------------------------------- retry


class Policy:
    max_retries = 3
    retry_backoff_s = 0.01


def classify_status(exc: Exception) -> Failure | None:
    if isinstance(exc, Refused):
        answer = exc.args[0]
        wait = parse_retry_after(answer.headers.get("Retry-After"))
        retryable = answer.status in (429, 503)
        return Failure(f"HTTP {answer.status}", retryable=retryable, code="x_error", server_wait_s=wait)
    return None


class Refused(Exception):
    pass


def post(url: str):
    answer = send(url, method="POST", body=b"{}")
    if not answer.ok:
        raise Refused(answer)
    return answer.body


def test_retries_wait_as_long_as_the_server_asks(server, caplog):
    caplog.set_level(logging.INFO)
    server.script = [(503, {"Retry-After": "0.4"}, b""), (429, {}, b"")]
    start = time.monotonic()
    assert with_retries(lambda: post(f"http://127.0.0.1:{server.port}/"), classify_status, Policy(), "ep") == b"ok"
    assert 0.4 <= time.monotonic() - start < 2
    assert len(server.requests) == 3 and "HTTP 503; retry 1/3" in caplog.text and "retry 2/3" in caplog.text


def test_retries_run_out_into_a_row_error_and_stop_at_the_first_final_failure(server):
    url = f"http://127.0.0.1:{server.port}/"
    server.script = [(503, {}, b"")] * 4
    error = with_retries(lambda: post(url), classify_status, Policy(), "ep")
    assert isinstance(error, RowError) and error.code == "x_error"
    assert error.message == "ep: HTTP 503 after 4 attempt(s)" and len(server.requests) == 4
    server.script = [(400, {}, b"")]
    assert with_retries(lambda: post(url), classify_status, Policy(), "ep").message == "ep: HTTP 400 after 1 attempt(s)"
    with pytest.raises(ZeroDivisionError):  # not a failure of the call: a bug, raised
        with_retries(lambda: 1 / 0, classify_status, Policy(), "ep")


@pytest.mark.parametrize("value, seconds", [("2", 2.0), ("0.5", 0.5), ("1.5s", 1.5), (3, 3.0), ("-1", None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", None), (None, None)])
def test_retry_after_values(value, seconds):
    assert parse_retry_after(value) == seconds


def test_retry_delays_double_with_jitter_and_honour_the_server_up_to_the_cap():
    for attempt in (1, 2, 3):
        delays = [retry_delay(attempt, 1.0) for _ in range(200)]
        assert 0.5 * 2 ** (attempt - 1) <= min(delays) < max(delays) <= 2 ** (attempt - 1)
    assert retry_delay(1, 0.01, server_wait_s=3.0) == 3.0
    assert retry_delay(1, 0.01, server_wait_s=10_000) == MAX_RETRY_AFTER_S


def test_a_refused_port_is_a_connect_failure_quickly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectFailed, match="refused"):
        send(f"http://127.0.0.1:{port}/")
    assert time.monotonic() - start < 2
