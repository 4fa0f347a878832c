"""Object storage through a real S3 server on loopback (SeaweedFS, conftest's `s3`): filesystems, jobs in and
out of S3, no leaked secrets."""

from __future__ import annotations

import io
import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from s3_server import CREDENTIALS, SECRET

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, StorageOptions
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem, s3_credentials
from vb_batch.io.outputs import read_output


def painted_parquet(n: int, start: int = 0) -> bytes:
    images = [png_bytes(depth.encode(np.full((16, 24), 1.0 + i, np.float32))) for i in range(start, start + n)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [f"img-{i:03d}" for i in range(start, start + n)], "image": images}), buffer)
    return buffer.getvalue()


def job(s3, input_url, output_url, **output):
    return {
        "input": {"path": input_url, "storage": s3.storage},
        "output": {"path": output_url, "mode": "overwrite", "storage": s3.storage, **output},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 4},
        "run": {"progress": False},
    }


def assert_no_secret(s3, prefix, *texts, also=()):
    """Neither the secret (nor any string in `also`) is in `texts` or in any object under `prefix`."""
    needles = [SECRET, *also]
    for text in texts:
        for needle in needles:
            assert needle not in text
    keys = s3.keys(prefix)
    assert keys
    for key in keys:
        data = s3.get(key)
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in s3://{s3.bucket}/{key}"


def test_one_storage_options_builds_both_filesystems(s3):
    storage = StorageOptions(**s3.storage)
    arrow_fs, path = arrow_filesystem(s3.url("a/b.parquet"), storage)
    assert isinstance(arrow_fs, pafs.S3FileSystem) and path == f"{s3.bucket}/a/b.parquet"
    # Credentials stay in the environment: nothing secret is pickled along with the filesystem.
    assert SECRET.encode() not in pickle.dumps(arrow_fs)
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=arrow_fs)
    fs, fs_path = fsspec_filesystem(s3.url("a/b.parquet"), storage)
    assert fs_path == path
    with fs.open(fs_path, "rb") as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2]
    # What s3fs writes, pyarrow lists at once (no stale listing cache between the two clients).
    fs.pipe_file(f"{s3.bucket}/a/c.txt", b"hi")
    assert [i.path for i in arrow_fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/a"))] == [path, f"{s3.bucket}/a/c.txt"]
    assert fs.ls(f"{s3.bucket}/a") == [path, f"{s3.bucket}/a/c.txt"]

    anonymous, _ = arrow_filesystem(s3.url("x"), StorageOptions(**s3.storage, anonymous=True))
    assert anonymous.__reduce__()[1][0]["anonymous"] is True
    assert fsspec_filesystem(s3.url("x"), StorageOptions(anonymous=True))[0].anon is True


def test_profile_credentials(s3, tmp_path, monkeypatch):
    # The server checks keys: only the profile's right ones may write, whatever the environment holds.
    key = CREDENTIALS["AWS_ACCESS_KEY_ID"]
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[archive]\naws_access_key_id = {key}\naws_secret_access_key = {SECRET}\n"
                           f"[stranger]\naws_access_key_id = strangerkey\naws_secret_access_key = {SECRET}-stranger\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "environmentkey")
    storage = StorageOptions(**s3.storage, profile="archive")
    assert s3_credentials(storage) == {"access_key": key, "secret_key": SECRET}
    arrow_fs, path = arrow_filesystem(s3.url("p.parquet"), storage)
    pq.write_table(pa.table({"x": [1]}), path, filesystem=arrow_fs)
    assert s3.keys("p.parquet") == ["p.parquet"]
    stranger, path = arrow_filesystem(s3.url("q.parquet"), StorageOptions(**s3.storage, profile="stranger"))
    with pytest.raises(OSError, match="INVALID_ACCESS_KEY_ID"):
        pq.write_table(pa.table({"x": [1]}), path, filesystem=stranger)
    assert s3.keys("q.parquet") == []
    with pytest.raises(ConfigError, match="storage.profile"):
        s3_credentials(StorageOptions(profile="nobody"))


def test_local_engine_in_and_out_of_s3_resumes_and_leaks_no_secret(s3, caplog, capfd):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="vb_batch")
    s3.put("in/part-0.parquet", painted_parquet(6))
    cfg = job(s3, s3.url("in/"), s3.url("out/labels"), rows_per_file=4, commit_every=4)
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_ok == 6
    s3.put("in/part-1.parquet", painted_parquet(4, start=6))  # new rows arrive
    cfg["output"]["mode"] = "resume"
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_skipped == 6 and summary.rows_ok == 4

    table = read_output(s3.url("out/labels"), storage=StorageOptions(**s3.storage))
    assert sorted(table.column("id").to_pylist()) == [f"img-{i:03d}" for i in range(10)]
    got = dict(zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "depth")))
    assert abs(float(got["img-007"][0, 0]) - 8.0) < 0.05
    keys = s3.keys("out/labels/")
    assert "out/labels/_SUCCESS" in keys and any(k.startswith("out/labels/_vb/commits/") for k in keys)
    assert not any("/_vb/staging/" in k for k in keys)
    captured = capfd.readouterr()
    assert_no_secret(s3, "out/", captured.out, captured.err, caplog.text, also=[CREDENTIALS["AWS_ACCESS_KEY_ID"]])


def test_keys_in_storage_options_are_masked_everywhere(s3, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="vb_batch")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3.put("in/images.parquet", painted_parquet(3))
    keys = {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": SECRET}
    cfg = job(s3, s3.url("in/images.parquet"), s3.url("out/masked"))
    cfg["input"]["storage"]["options"] = dict(keys)
    cfg["output"]["storage"]["options"] = dict(keys)
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_ok == 3
    captured = capfd.readouterr()
    assert_no_secret(s3, "out/masked/", captured.out, captured.err, caplog.text, summary.render())


def test_image_folder_on_s3_fetched_by_uri(s3, tmp_path):
    for i in range(3):
        s3.put(f"photos/set-{i % 2}/p{i}.png", png_bytes(depth.encode(np.full((12, 12), 2.0 + i, np.float32))))
    s3.put("photos/notes.txt", b"not an image")
    cfg = job(s3, s3.url("photos/"), str(tmp_path / "out"))
    cfg["input"]["min_side"] = 4
    cfg["output"]["storage"] = {}
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_ok == 3
    table = read_output(str(tmp_path / "out")).sort_by("id")
    assert table.column("id").to_pylist() == ["set-0/p0.png", "set-0/p2.png", "set-1/p1.png"]
    assert table.column("uri").to_pylist()[0] == s3.url("photos/set-0/p0.png")
    assert [round(float(d[0, 0])) for d in vb_batch.load_arrays(table, "depth")] == [2, 4, 3]
