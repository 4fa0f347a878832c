"""Which URIs a job fetches: never an internal address unless allowed, only URIs under `input.allowed_prefixes`.

End to end through a run (a loopback server counts every request: none is made), and `check_uri` on
the prefix rules (`..` segments, a bucket whose name merely starts with an allowed one, another scheme).
The fetcher's own safety (redirects, sizes, timeouts, file kinds) is in test_fetch.py.
"""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.fetch import check_uri
from vb_batch.io.outputs import read_output


class CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        CountingHandler.hits.append(self.path)
        data = png_bytes(depth.encode(np.full((16, 16), 2.0, np.float32)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_server():
    CountingHandler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_internal_addresses_are_never_fetched(tmp_path, web_server):
    uris = [f"{web_server}/a.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "file:///etc/passwd"]
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "uri": uris}), tmp_path / "in.parquet")
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet"), "uri_column": "uri", "allowed_prefixes": ["http://", "https://"]},
        "output": {"path": str(tmp_path / "out")},
        "model": {"backend": "identity"},
        "run": {"progress": False, "max_error_fraction": 1.0},
    }
    vb_batch.annotate(cfg)
    errors = read_output(str(tmp_path / "out")).sort_by("id").column("vb_error").to_pylist()
    assert [e["code"] for e in errors] == ["uri_not_allowed"] * 4
    assert "internal address 127.0.0.1" in errors[0]["message"]
    assert CountingHandler.hits == []  # nothing was requested
    # Explicitly allowed, the same loopback server is fetched.
    cfg["input"]["allow_private_addresses"] = True
    cfg["output"]["mode"] = "overwrite"
    vb_batch.annotate(cfg)
    errors = read_output(str(tmp_path / "out")).sort_by("id").column("vb_error").to_pylist()
    assert errors[0] is None and set(CountingHandler.hits) == {"/a.png"}


@pytest.mark.parametrize(
    "uri, prefixes, allowed",
    [
        ("/data/imgs/a.png", ["/data/imgs"], True),
        ("/data/imgs/../secrets/a.png", ["/data/imgs"], False),
        ("/data/imgs-other/a.png", ["/data/imgs"], False),
        ("file:///data/imgs/a.png", ["/data/imgs/"], True),
        ("s3://bucket/imgs/a.png", ["s3://bucket/imgs"], True),
        ("s3://bucket/imgs/../private/a.png", ["s3://bucket/imgs"], False),
        ("s3://bucket-evil/imgs/a.png", ["s3://bucket"], False),
        ("gs://bucket/imgs/a.png", ["s3://"], False),
    ],
)
def test_allowed_prefixes(uri, prefixes, allowed):
    cfg = InputConfig(path="/data/table.parquet", allowed_prefixes=prefixes)
    if allowed:
        check_uri(uri, cfg)
    else:
        with pytest.raises(RowError) as info:
            check_uri(uri, cfg)
        assert info.value.code == "uri_not_allowed"
