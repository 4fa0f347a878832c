"""A real S3 protocol server on loopback (moto's server mode) for tests of object storage.

    with s3_server() as s3:                   # starts on 127.0.0.1, a free port; stops on exit
        s3.put("in/images.parquet", data)     # bucket s3.bucket exists, empty
        cfg = {"input": {"path": s3.url("in/images.parquet"), "storage": s3.storage}, ...}

Clients reach it with the fake credentials in `CREDENTIALS`, which tests put
in the environment (`use_fake_credentials(monkeypatch)`) the way a real job
gets its own: the secret is a distinctive string, so a test can scan logs and
outputs for it. Nothing reaches the network: the AWS config files are pointed
away and the instance metadata service is switched off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SECRET = "vbTestSecretKey-9f3c1e7a-do-not-leak"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vbtestaccesskey",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
REGION = "us-east-1"


def use_fake_credentials(monkeypatch) -> None:
    """Put the fake credentials in the environment (undone by monkeypatch); drop any real ones."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    client: Any = field(repr=False)

    @property
    def storage(self) -> dict[str, Any]:
        """`input.storage` / `output.storage` for a job that uses this server (no credentials: the environment's)."""
        return {"endpoint_url": self.endpoint_url, "region": REGION}

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(bucket: str | None = None) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (a free port) with one empty bucket; stopped on exit.

    moto keeps its store per process, shared by every server: each call gets a fresh bucket.
    """
    import uuid

    bucket = bucket or f"vb-test-{uuid.uuid4().hex[:10]}"
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, client)
    finally:
        server.stop()


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that fails some requests on purpose.

    Request n (1-based) fails when n % every == 0: alternately with a 503
    SlowDown answer and with a connection closed mid-request (a reset). Every
    other request is forwarded unchanged. `faults` counts injected faults per
    HTTP method, `requests` all requests seen.
    """

    def __init__(self, upstream: str, every: int = 3):
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.every = every
        self.requests = 0
        self.faults: dict[str, int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                import http.client
                import socket

                body = self._read_body()
                with proxy._lock:
                    proxy.requests += 1
                    n = proxy.requests
                if n % proxy.every == 0:
                    with proxy._lock:
                        proxy.faults[self.command] = proxy.faults.get(self.command, 0) + 1
                    if (n // proxy.every) % 2:
                        error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(error)))
                        self.end_headers()
                        self.wfile.write(error)
                    else:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding", "content-length")
                }
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    # A HEAD answer's length is the object's, not the (empty) body's.
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
