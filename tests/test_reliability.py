"""Reliability and safety on the local engine: hostile input, model faults, URI safety, storage faults.

The hostile table runs on Ray and Spark too (test_ray.py, test_spark.py), and the
kill -9 + resume tests live in test_sink.py (local) and test_ray.py.
"""

from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from s3_server import FaultyProxy, s3_server, use_fake_credentials

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.fetch import check_uri
from vb_batch.io.outputs import read_output
from vb_batch.models.identity import IdentityBackend


class OutOfMemoryAbove(IdentityBackend):
    """Raises torch's CUDA out-of-memory error for batches larger than `limit`."""

    def __init__(self, limit):
        self.limit = limit
        self.sizes = []

    def predict(self, images, prompts, task, seeds):
        import torch

        self.sizes.append(len(images))
        if len(images) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(images)


class FailsOnOneImage(IdentityBackend):
    """A model fault on one particular image (all-black), fine on every other."""

    def predict(self, images, prompts, task, seeds):
        if any(int(im.max()) == 0 for im in images):
            raise ValueError("NaN in the latents")
        return list(images)


def painted_rows(tmp_path, n, black=()):
    cells = []
    for i in range(n):
        rgb = np.zeros((16, 16, 3), np.uint8) if i in black else depth.encode(np.full((16, 16), 1.0 + i, np.float32))
        cells.append(png_bytes(rgb))
    pq.write_table(pa.table({"id": list(range(n)), "image": cells}), tmp_path / "in.parquet")
    return {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "mode": "overwrite"},
        "model": {"backend": "identity", "batch_size": 8},
        "run": {"progress": False},
    }


def test_out_of_memory_splits_the_batch(tmp_path):
    backend = OutOfMemoryAbove(limit=2)
    summary = vb_batch.annotate(painted_rows(tmp_path, 8), backend=backend)
    assert summary.rows_ok == 8 and summary.rows_failed == 0
    assert backend.sizes[:3] == [8, 4, 2]  # halves, not single rows
    assert max(s for s in backend.sizes[1:]) <= 4
    out = read_output(str(tmp_path / "out")).sort_by("id")
    medians = out.column("depth_median_m").to_pylist()
    assert np.allclose(medians, [1.0 + i for i in range(8)], rtol=0.01)


def test_one_bad_row_does_not_fail_its_batch(tmp_path):
    summary = vb_batch.annotate(painted_rows(tmp_path, 8, black={3}), backend=FailsOnOneImage(None))
    assert summary.rows_ok == 7 and summary.errors_by_code == {"model_error": 1}
    errors = read_output(str(tmp_path / "out")).sort_by("id").column("vb_error").to_pylist()
    assert [e and e["code"] for e in errors] == [None, None, None, "model_error", None, None, None, None]
    assert "NaN in the latents" in errors[3]["message"]


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


def test_transient_s3_faults_are_retried(tmp_path, monkeypatch):
    use_fake_credentials(monkeypatch)
    with s3_server() as s3, FaultyProxy(s3.endpoint_url, every=3) as proxy:
        images = [png_bytes(depth.encode(np.full((16, 16), 1.0 + i, np.float32))) for i in range(40)]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(40)), "image": images}), buffer, row_group_size=10)
        s3.put("in/images.parquet", buffer.getvalue())
        storage = {"endpoint_url": proxy.endpoint_url, "region": "us-east-1"}
        cfg = {
            "input": {"path": s3.url("in/images.parquet"), "storage": storage},
            "output": {"path": s3.url("out"), "storage": storage, "rows_per_file": 8, "commit_every": 8},
            "model": {"backend": "identity", "batch_size": 8},
            "run": {"progress": False},
        }
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_ok == 40
        assert proxy.faults.get("GET", 0) > 0 and proxy.faults.get("PUT", 0) > 0, proxy.faults
        from vb_batch.config import StorageOptions

        table = read_output(s3.url("out"), storage=StorageOptions(endpoint_url=s3.endpoint_url, region="us-east-1"))
        assert sorted(table.column("id").to_pylist()) == list(range(40))
        assert "out/_SUCCESS" in s3.keys("out/")
