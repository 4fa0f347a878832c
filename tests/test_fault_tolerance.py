"""A fault costs no more than it must: the batch survives its model's faults, a run survives transient storage faults.

- a model out of GPU memory on a batch gets that batch again in halves (not single rows) until it fits;
- a model error on one image fails that row (`model_error`, with the model's message), not its batch;
- transient S3 errors (a proxy failing every third request, GET and PUT) are retried and the run
  completes with every row.

The hostile table on Ray and Spark is in test_ray.py and test_spark.py; kill -9 and resume are in
test_crash_recovery.py.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from s3_server import FaultyProxy, s3_server, use_fake_credentials

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import StorageOptions
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


@pytest.mark.slow  # ~40 s: the retries back off
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
        table = read_output(s3.url("out"), storage=StorageOptions(endpoint_url=s3.endpoint_url, region="us-east-1"))
        assert sorted(table.column("id").to_pylist()) == list(range(40))
        assert "out/_SUCCESS" in s3.keys("out/")
