"""Writer fencing (issue 30, race R1): a writer that lost the output's lease can never add to it.

Writer A stops (SIGSTOP: every thread, its heartbeat too) at one exact point of a commit; writer B
watches A's silent lease for `lease_seconds`, takes it over, fences A out of the output's log and
finishes; then A continues. Whatever the point, on local files and on SeaweedFS's S3:

- the output reads, with the format's own reader too (deltalake), and holds every id exactly once;
- A exits 1 with one line that says the lease was lost; a later resume finds nothing to do.

The points, for Delta: files moved into the table, no commit yet (`moved`); the fence checked at
the version read, the commit not yet sent (`checked`: only the log's check at that exact version
can stop A). For Parquet: the lease checked, no record yet (`checked`); the record written, not yet
checked against the lease (`recorded`: B's recovery rolls it forward); record and lease checked,
files not yet moved (`moved`). The same again with A's wall clock a lease and a second behind.

This file is also the child: `python tests/test_writer_fencing.py JOB POINT N PAUSED SKEW` runs
`vb-batch run JOB`, stopping itself at the N-th call of POINT after writing the file PAUSED, its
clock SKEW seconds behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from output_safety import (
    TESTS,
    assert_each_id_once,
    child_env,
    job,
    parquet_bytes,
    write_images,
)

import vb_batch
from vb_batch.config import StorageOptions
from vb_batch.io.sinks.delta import WRITER_APP
from vb_batch.io.tables.delta import delta_table

LEASE_S = 1.0  # short leases keep each race short; the rule is the same at 120 s
CASES = [("delta", "moved", 1), ("delta", "checked", 1), ("delta", "checked", 2),
         ("parquet", "checked", 1), ("parquet", "recorded", 1), ("parquet", "moved", 2)]


def pause_points() -> dict[str, tuple[object, str, str]]:
    """(format, point) -> (owner, attribute, phase): where the child stops itself."""
    from vb_batch.io.sinks import parquet
    from vb_batch.io.sinks.delta import DeltaSink
    from vb_batch.io.sinks.parquet import ParquetSink

    return {
        "delta:moved": (DeltaSink, "_commit_added", "before"),
        "delta:checked": (DeltaSink, "_commit_properties", "after"),  # called between the check and the commit
        "parquet:checked": (ParquetSink, "_commit_files", "before"),
        "parquet:recorded": (parquet, "write_atomic", "after"),
        "parquet:moved": (ParquetSink, "_apply", "before"),
    }


def child(job_path: str, point: str, nth: str, paused: str, skew: str) -> int:
    from vb_batch.cli import main

    owner, attribute, phase = pause_points()[point]
    real, calls = getattr(owner, attribute), [0]

    def pausing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth) and phase == "before":
            stop()
        result = real(*args, **kwargs)
        if calls[0] == int(nth) and phase == "after":
            stop()
        return result

    def stop():
        Path(paused).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)

    setattr(owner, attribute, pausing)
    if float(skew):
        real_time = time.time
        time.time = lambda: real_time() - float(skew)
    return main(["run", job_path])


def wait_for(predicate, what: str, seconds: float = 90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def race(cfg: dict, fmt: str, point: str, nth: int, tmp_path: Path, skew: float = 0.0) -> tuple[int, str]:
    """A pauses at `point`, B takes over and finishes, A continues: (A's exit code, A's stderr)."""
    job_path, paused = tmp_path / "a.yaml", tmp_path / "a.paused"
    job_path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, __file__, str(job_path), f"{fmt}:{point}", str(nth), str(paused), str(skew)]
    writer_a = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: paused.exists() or writer_a.poll() is not None, "writer A to pause")
        assert writer_a.poll() is None, writer_a.communicate()
        # A's last heartbeat must look old to B (a recent one is refused at once); B then watches it a lease.
        time.sleep(LEASE_S * 1.5)
        summary = vb_batch.annotate(cfg)  # writer B
        assert summary.success
    finally:
        os.kill(writer_a.pid, signal.SIGCONT)
        _, stderr = writer_a.communicate(timeout=120)
    return writer_a.returncode, stderr


def writer_epoch(path: str) -> int | None:
    """The writer epoch a Delta table's log holds (None: no table, or no epoch yet)."""
    table = delta_table(path, None)
    return table.transaction_version(WRITER_APP) if table is not None else None


def check_output(fmt: str, out: dict, cfg: dict, ids: list[str], code: int, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("vb-batch:")]
    assert code == 1 and lines and "lease lost" in lines[-1], stderr
    assert_each_id_once(out, ids)
    if fmt == "delta":  # deltalake itself reads the table: no add-action names a file that is gone
        table = delta_table(out["path"], StorageOptions(**out.get("storage", {})))
        assert sorted(table.to_pyarrow_table(columns=["id"]).column("id").to_pylist()) == sorted(ids)
    again = vb_batch.annotate(cfg)  # every later resume works, and has nothing left to do
    assert again.success and again.rows_ok == 0 and again.rows_skipped == len(ids)
    assert_each_id_once(out, ids)


@pytest.mark.slow  # 3-4 s each: a writer paused for a lease, then resumed
@pytest.mark.parametrize("skew", [0.0, LEASE_S + 1], ids=["same-clock", "clock-behind"])
@pytest.mark.parametrize(("fmt", "point", "nth"), CASES)
def test_a_paused_writer_never_adds_to_a_local_output(fmt, point, nth, skew, tmp_path):
    ids = write_images(tmp_path / "in.parquet", 16)
    out = {"format": fmt, "path": str(tmp_path / "labels"), "lease_seconds": LEASE_S}
    cfg = job(tmp_path / "in.parquet", out)
    code, stderr = race(cfg, fmt, point, nth, tmp_path, skew)
    check_output(fmt, out, cfg, ids, code, stderr)


@pytest.mark.slow  # 3-4 s each: a writer paused for a lease, then resumed
@pytest.mark.parametrize("nth", [1, 2])
def test_a_paused_writer_never_adds_to_a_partitioned_delta_table(nth, tmp_path):
    """Partitioned tables commit through delta-rs's own writer (no files moved): the same fence holds."""
    ids = write_images(tmp_path / "in.parquet", 16)
    out = {"format": "delta", "path": str(tmp_path / "labels"), "lease_seconds": LEASE_S, "partition_by": ["note"]}
    cfg = job(tmp_path / "in.parquet", out)
    code, stderr = race(cfg, "delta", "checked", nth, tmp_path)
    check_output("delta", out, cfg, ids, code, stderr)


@pytest.mark.slow  # 5-8 s each: the same on S3
@pytest.mark.parametrize(("fmt", "point", "nth"), [c for c in CASES if c[2] == 1] + [("parquet", "moved", 1)])
def test_a_paused_writer_never_adds_to_an_output_on_s3(fmt, point, nth, s3, tmp_path):
    ids = write_images(tmp_path / "in.parquet", 16)
    s3.put("in/part-0.parquet", parquet_bytes(pq.read_table(tmp_path / "in.parquet")))
    out = {"format": fmt, "path": s3.url("labels"), "storage": s3.storage, "lease_seconds": LEASE_S}
    cfg = job(s3.url("in/"), out)
    cfg["input"]["storage"] = s3.storage
    code, stderr = race(cfg, fmt, point, nth, tmp_path, skew=LEASE_S + 1 if point == "checked" else 0.0)
    check_output(fmt, out, cfg, ids, code, stderr)
    assert not any("/_vb/intents/" in key for key in s3.keys("labels/"))


def test_a_commit_in_flight_is_fenced_even_when_its_lease_was_removed_by_hand(tmp_path):
    """Someone deletes `_vb/lease.json` while A is paused after its fence check, its files moved: B gets
    the lease at once (no takeover), and its recovery deletes A's files; B's fence, committed before
    that recovery because A's intent is in flight, is what stops A's add-actions for those files."""
    ids = write_images(tmp_path / "in.parquet", 16)
    out = {"format": "delta", "path": str(tmp_path / "labels"), "lease_seconds": 60.0}
    cfg = job(tmp_path / "in.parquet", out)
    job_path, paused, gate = tmp_path / "a.yaml", tmp_path / "a.paused", tmp_path / "gate"
    gated_model = {"backend": "crashing_job:GatedBackend", "batch_size": 4}  # one model, so one job for both
    cfg["model"] = {**gated_model, "options": {"gate": str(tmp_path / "in.parquet")}}  # A's gate is open
    job_path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, __file__, str(job_path), "delta:checked", "1", str(paused), "0"]
    writer_a = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # B waits in its model after opening the output: A continues between B's recovery and B's first commit.
    gated = {**cfg, "model": {**gated_model, "options": {"gate": str(gate)}}}
    results: list = []
    writer_b = threading.Thread(target=lambda: results.append(vb_batch.annotate(gated)))
    try:
        wait_for(lambda: paused.exists() or writer_a.poll() is not None, "writer A to pause")
        assert writer_a.poll() is None, writer_a.communicate()
        assert list((tmp_path / "labels" / "_vb" / "intents").glob("*.json"))  # A's commit is in flight
        (tmp_path / "labels" / "_vb" / "lease.json").unlink()
        writer_b.start()
        wait_for(lambda: not list((tmp_path / "labels" / "_vb" / "intents").glob("*.json")), "B's fence and recovery")
    finally:
        os.kill(writer_a.pid, signal.SIGCONT)
        _, stderr = writer_a.communicate(timeout=120)
        gate.touch()
        if writer_b.ident is not None:
            writer_b.join(timeout=120)
    assert results and results[0].success and writer_epoch(out["path"]) == 1
    check_output("delta", out, cfg, ids, writer_a.returncode, stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    sys.exit(child(*sys.argv[1:]))


def test_a_run_taken_over_before_its_first_record_cannot_land_its_late_one(tmp_path):
    """Parquet: the run replaced wrote no record of its epoch yet; the new holder's epoch is above it anyway, so
    the one record the replaced run can still write (at the new holder's fence's sequence number) is stale."""
    from types import SimpleNamespace

    from vb_batch.config import OutputConfig
    from vb_batch.io.formats import open_sink
    from vb_batch.io.sinks.parquet import commit_records
    from vb_batch.io.sinks.staging import part_file_name

    out = OutputConfig(path=str(tmp_path / "out"), mode="resume")
    schema = pa.schema([pa.field("id", pa.string())])
    old = open_sink(out, "run-old", schema, "id")
    old._fence()  # opened: its epoch taken, no record written
    new = open_sink(out, "run-new", schema, "id")
    new.lease = SimpleNamespace(taken_over_from="run-old", check=lambda: None)
    new._fence()  # takes the output over: its fence record, at the next sequence number
    assert new._epoch > old._epoch
    old._write_record({"files": [part_file_name("run-old", "00000")], "rows": 1})  # paused until now
    records = commit_records(new.fs, new.meta)
    assert [r for _, r in records if r is not None and r.get("run_id") == "run-old"] == []
    assert new.committed_files() == []
