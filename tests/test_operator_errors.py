"""Operator-facing failures end in one clear line naming what to fix: exit 2 (config) or 1 (run), no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_bytes
from s3_server import s3_server, use_fake_credentials

from vb_batch.cli import main
from vb_batch.codecs import depth


def write_input(path):
    image = png_bytes(depth.encode(np.full((16, 16), 2.0, np.float32)))
    pq.write_table(pa.table({"id": [1, 2, 3], "image": [image] * 3}), path)


def write_job(tmp_path, **output) -> str:
    write_input(tmp_path / "in.parquet")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), **output},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }))
    return str(path)


def one_clear_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("vb-batch: "), err
    return lines[0]


def test_report_and_show_of_a_missing_output(tmp_path, capfd):
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in one_clear_line(capfd.readouterr().err)
    assert main(["show", str(tmp_path / "nowhere"), "--id", "1"]) == 1
    assert "nowhere" in one_clear_line(capfd.readouterr().err)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_storage_endpoint_is_named_quickly(tmp_path, capfd, monkeypatch):
    use_fake_credentials(monkeypatch)
    storage = {"endpoint_url": f"http://127.0.0.1:{closed_port()}", "max_attempts": 1, "timeout_s": 1}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": "s3://bucket/in.parquet", "storage": storage},
        "output": {"path": str(tmp_path / "out")}, "model": {"backend": "identity"}, "run": {"progress": False},
    }))
    started = time.perf_counter()
    code = main(["run", str(path)])
    line = one_clear_line(capfd.readouterr().err)
    assert code in (1, 2) and time.perf_counter() - started < 30
    assert "storage" in line or "input.path" in line


def test_an_output_bucket_that_does_not_exist_is_never_created(tmp_path, capfd, monkeypatch):
    use_fake_credentials(monkeypatch)
    with s3_server() as s3:
        job = write_job(tmp_path)
        code = main(["run", job, "output.path=s3://no-such-bucket-vb/labels", f"output.storage={yaml.safe_dump(s3.storage)}"])
        line = one_clear_line(capfd.readouterr().err)
        assert code == 2 and "output.path" in line and "no-such-bucket-vb" in line
        assert "no-such-bucket-vb" not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


def read_only_folder(tmp_path):
    """A folder no one may write to, root included: a read-only tmpfs (skipped where mounting is not allowed)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    return folder, lambda: subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_output_fails_with_one_line(tmp_path, capfd):
    folder, restore = read_only_folder(tmp_path)
    try:
        code = main(["run", write_job(tmp_path), f"output.path={folder / 'out'}"])
        line = one_clear_line(capfd.readouterr().err)
    finally:
        restore()
    assert code == 1 and ("permission denied" in line or "Read-only" in line), line


def test_verbose_shows_the_traceback(tmp_path, capfd):
    assert main(["-v", "report", str(tmp_path / "nowhere")]) == 1
    assert "Traceback" in capfd.readouterr().err
