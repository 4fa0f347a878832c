"""Hostile URIs, local files and HTTP servers, for the fetch tests and for rows of the hostile table.

    with HostileServer() as server:                       # 127.0.0.1, a free port; stopped on exit
        rows = hostile_uri_rows(images, server)          # {row id: (uri, expected code or None)}
        job["input"].update(hostile_uri_input(images, server))

The rows work on every engine (Ray and Spark workers reach the server on
loopback): the job allows private addresses, because the server is on one;
refused redirects are refused by `input.allowed_prefixes`, before any request.
A redirect refused by the address rule needs `public_names` (one process only).

Server routes (GET):
    /image.png           a valid 24 x 32 PNG
    /chain/N             N redirects, then the image
    /loop                redirects to itself forever
    /redirect?to=URL     one redirect to URL
    /huge                1 GiB of body, no Content-Length (streamed from one buffer, never allocated)
    /huge-declared       the same with Content-Length: 1073741824
    /stall               accepts the request, never answers
    /drip                the whole answer, headers included, one byte per `drip_interval` seconds
    /status/N            an empty answer with status N

`StallingEndpoint` takes connections and never answers any protocol (an S3 endpoint that hangs);
`public_names` makes a test host name count as public; `make_fifo` makes a named pipe.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
from conftest import png_bytes

from vb_batch.io import fetch

GIB = 1 << 30
IMAGE = png_bytes(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (24, 1, 3)))

# Cells that name nothing openable, whatever the job allows: (cell, expected code).
MALFORMED_URIS: dict[str, tuple[object, str]] = {
    "bad-nul-uri": ("/images/a\x00.png", "uri_invalid"),
    "bad-nul-escaped-file-uri": ("file:///images/a%00.png", "uri_invalid"),
    "bad-ipv6-bracket": ("http://[::1/x.png", "uri_invalid"),
    "bad-ipv6-zone": ("http://[fe80::1%25eth0]/x.png", "uri_invalid"),
    "bad-port": ("http://example.com:99999/x.png", "uri_invalid"),
    "bad-port-text": ("http://example.com:port/x.png", "uri_invalid"),
    "bad-empty-s3": ("s3://", "uri_invalid"),
    "bad-s3-bucket-only": ("s3://bucket", "uri_invalid"),
    "bad-no-host": ("http:///x.png", "uri_invalid"),
    "bad-file-on-host": ("file://server/x.png", "uri_invalid"),
    "bad-file-relative": ("file:x.png", "uri_invalid"),
    "bad-data-uri": ("data:image/png;base64,iVBORw0KGgo=", "uri_invalid"),
    "bad-control-char": ("http://example.com/a\nb.png", "uri_invalid"),
    "bad-lone-surrogate": ("/images/\ud800.png", "uri_invalid"),
    "bad-empty": ("", "uri_invalid"),
    "bad-huge-uri": ("http://example.com/" + "a" * 100_000, "uri_invalid"),
    "bad-not-text": (12345, "uri_invalid"),
    "bad-bytes-cell": (b"/images/a.png", "uri_invalid"),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.hits.append(self.path)
        self.server.headers.append(dict(self.headers))
        parts = urlsplit(self.path)
        path = parts.path
        try:
            if path == "/image.png":
                self._answer(200, IMAGE)
            elif path.startswith("/chain/"):
                hops = int(path.rsplit("/", 1)[1])
                self._redirect(f"/chain/{hops - 1}") if hops > 0 else self._answer(200, IMAGE)
            elif path == "/loop":
                self._redirect("/loop")
            elif path == "/redirect":
                self._redirect(parse_qs(parts.query)["to"][0])
            elif path in ("/huge", "/huge-declared"):
                self._stream(GIB, declared=path == "/huge-declared")
            elif path == "/stall":
                self.server.stopping.wait(120)
            elif path == "/drip":
                self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(IMAGE) + IMAGE)
            elif path.startswith("/status/"):
                self._answer(int(path.rsplit("/", 1)[1]), b"")
            else:
                self._answer(404, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, size: int, declared: bool) -> None:
        self.send_response(200)
        if declared:
            self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        block = memoryview(bytes(1 << 20))
        self.wfile.write(IMAGE[:16])  # starts like a PNG
        sent = 16
        while sent < size and not self.server.stopping.is_set():
            chunk = block[: min(len(block), size - sent)]
            self.wfile.write(chunk)
            sent += len(chunk)
        self.close_connection = True

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.stopping.wait(self.server.drip_interval):
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hits: list[str]
    headers: list[dict[str, str]]
    stopping: threading.Event
    drip_interval: float


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 with the hostile routes above; use as a context manager."""

    def __init__(self, drip_interval: float = 0.3, tls: tuple[Path, Path] | None = None):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hits = []
        self._server.headers = []
        self._server.stopping = threading.Event()
        self._server.drip_interval = drip_interval
        self.scheme = "https" if tls else "http"
        if tls:  # (certificate, key), e.g. from `self_signed_certificate`
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.base = f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def hits(self) -> list[str]:
        """The paths requested so far, in order."""
        return self._server.hits

    @property
    def headers(self) -> list[dict[str, str]]:
        """The request headers of each hit, in order."""
        return self._server.headers

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def redirect_url(self, to: str, host: str = "127.0.0.1") -> str:
        return self.url("/redirect?to=" + quote(to, safe=""), host)

    def __enter__(self) -> HostileServer:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def public_names(names: dict[str, str]) -> Iterator[None]:
    """Resolve each test host name to its address AS IF public (fetch.resolve swapped, this process only).

    Everything else resolves as usual, so a literal 127.0.0.1 stays internal:
    a first hop through a public-looking name can then redirect to loopback.
    """
    real = fetch.resolve

    def resolve(host: str, port: int) -> list[fetch.Address]:
        if host in names:
            return [fetch.Address(names[host], internal=False)]
        return real(host, port)

    fetch.resolve = resolve
    try:
        yield
    finally:
        fetch.resolve = real


class StallingEndpoint:
    """http://127.0.0.1:PORT that takes every connection and never answers, for any client (S3 too)."""

    def __init__(self):
        import socket

        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections: list = []  # held open, unanswered
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self._listener.accept()[0])
            except OSError:
                return  # closed

    def __enter__(self) -> StallingEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        import socket

        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._listener.close()
        for conn in self.connections:
            conn.close()


def self_signed_certificate(folder: Path, host: str) -> tuple[Path, Path]:
    """(certificate, key) for `host`, made by the openssl command line (pytest.skip without it)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = folder / f"{host}.crt", folder / f"{host}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=DNS:{host}"],
        check=True, capture_output=True,
    )
    return cert, key


def make_fifo(folder: Path, name: str = "fifo.png") -> Path:
    """A named pipe with no writer: opening it for reading the usual way blocks forever."""
    path = folder / name
    if not path.exists():
        os.mkfifo(path)
    return path


def _storable(cell: object) -> bool:
    """Whether an Arrow string column can hold the cell (not bytes, numbers or lone surrogates)."""
    try:
        return isinstance(cell, str) and bool(cell.encode("utf-8"))
    except UnicodeEncodeError:
        return False


def hostile_uri_rows(images: Path, server: HostileServer) -> dict[str, tuple[object, str | None]]:
    """Rows for the hostile table: {id: (uri cell, expected vb_error code or None)}; see `hostile_uri_input`."""
    outside = images.parent / "outside.png"
    rows: dict[str, tuple[object, str | None]] = {k: v for k, v in MALFORMED_URIS.items() if _storable(v[0])}
    rows.update(
        {
            "bad-nul-uri": (str(images / "a\x00.png"), "uri_invalid"),
            "bad-upper-s3-scheme": ("S3://bucket/k.png", "uri_not_allowed"),
            "bad-file-colon-escape": (f"file:{outside}", "uri_not_allowed"),
            "bad-local-colon-escape": (f"local:{outside}", "uri_not_allowed"),
            "bad-file-four-slashes": (f"file:///{outside}", "uri_not_allowed"),
            "bad-redirect-to-metadata": (
                server.redirect_url("http://169.254.169.254/latest/meta-data/"),
                "uri_not_allowed",
            ),
            "bad-redirect-to-file": (server.redirect_url(f"file://{images}/x.png"), "uri_not_allowed"),
            "bad-redirect-loop": (server.url("/loop"), "fetch_error"),
            "bad-http-404": (server.url("/status/404"), "not_found"),
            "bad-huge-body": (server.url("/huge"), "too_large"),
            "bad-huge-declared": (server.url("/huge-declared"), "too_large"),
            "bad-stalling-server": (server.url("/stall"), "fetch_timeout"),
            "bad-fifo": (str(make_fifo(images)), "not_a_file"),
            "bad-dev-zero": ("/dev/zero", "not_a_file"),
            "ok-http-image": (server.url("/image.png"), None),
            "ok-http-redirected": (server.url("/chain/3"), None),
        }
    )
    return rows


def hostile_uri_input(images: Path, server: HostileServer) -> dict:
    """`input` settings under which `hostile_uri_rows` give their codes (merge into the hostile job)."""
    return {
        "allowed_prefixes": [str(images), server.url("/"), "/dev/zero"],
        "allow_private_addresses": True,  # the server is on loopback
        "max_bytes": 1_000_000,  # the 1 GiB bodies stop here
        "storage": {"timeout_s": 1.0},  # the stalling server costs 1 s
    }
