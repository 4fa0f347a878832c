"""A full disk fails the run with an error, never a hang, and leaves no partial record or lease.

The next run, with space again, completes the output. The disk is a 2 MB tmpfs, which needs root
(CI runs as root); elsewhere these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from output_safety import (
    job,
    output_ids,
)

import vb_batch
from vb_batch.config import OutputConfig
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.lease import Lease
from vb_batch.io.outputs import read_output


def noise_images(n: int, side: int = 96) -> pa.Table:
    """Rows of incompressible images (random pixels): they fill a small disk quickly."""
    rng = np.random.default_rng(17)
    cells = [png_bytes(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    return pa.table({"id": [f"img-{i}" for i in range(n)], "image": pa.array(cells, pa.binary())})


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp/disk (root only: CI runs as root), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a small tmpfs, and mounting one needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Write to `disk` until it is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_leaves_no_partial_record_or_lease(small_disk):
    from vb_batch.io.sinks import write_atomic

    meta = small_disk / "labels" / "_vb"
    meta.mkdir(parents=True)
    fill(small_disk)
    fs, _ = fsspec_filesystem(str(small_disk / "labels"))
    with pytest.raises(OSError):
        write_atomic(fs, str(meta / "commits" / "c000000000000-run.json"), json.dumps({"files": ["x"] * 999}).encode())
    with pytest.raises(OSError):
        Lease(fs, str(meta), str(small_disk / "labels"), "run", 120).acquire()
    assert [p.name for p in meta.rglob("*") if p.is_file()] == []  # no empty record, no half lease, no temporary file


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_full_disk_fails_the_run_and_the_next_run_completes(fmt, small_disk, tmp_path):
    table = noise_images(90)
    pq.write_table(table, tmp_path / "in.parquet")
    out = {"format": fmt, "path": str(small_disk / "labels")}
    cfg = job(tmp_path / "in.parquet", out)
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        vb_batch.annotate(cfg)
    assert "No space left on device" in str(failure.value) or failure.value.errno == 28, failure.value
    assert time.monotonic() - started < 60  # an error, not a hang
    committed = output_ids(out)
    assert 0 < len(committed) < 90 and len(set(committed)) == len(committed)
    for path in (small_disk / "labels" / "_vb").rglob("*.json"):
        json.loads(path.read_text())  # no half-written record anywhere
    assert not (small_disk / "labels" / "_SUCCESS").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_skipped == len(committed)
    ids = read_output(OutputConfig(**out), columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(table.column("id").to_pylist())
