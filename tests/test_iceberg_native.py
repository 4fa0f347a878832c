"""Iceberg keeps vb_batch's bookkeeping in its own metadata, and its catalog's commits are the fence (issue 30).

On the SQLite catalog and on the REST catalog over SeaweedFS's table bucket alike:

- a run leaves nothing in the table's location but data files and the catalog's metadata; the writer
  lease, the epoch, the fingerprint and the last run's record are table properties, each snapshot's
  summary names its run, commit and epoch;
- a table that lost its `vb.fingerprint` still refuses another job (its rows say what it holds); an
  unreadable `vb.writer` names no holder and is taken over after the run watched it for its lease;
- R1: writer A commits once, then pauses after building its second commit (its data files written
  and read) and before the catalog gets it; B watches A's silent lease, takes it over, commits its
  epoch (an empty snapshot), deletes the part files A staged and never committed (not those of its
  first commit) and finishes. A resumes: the catalog refuses its commit (`main` moved), A reads the
  table again, finds another writer and stops with "lease lost". The table reads, every id once.

The paused writer is this module run as a script (`python tests/test_iceberg_native.py SPEC.json`):
it pauses inside pyiceberg's `Transaction.commit_transaction`, at its second data commit, until the
test creates a gate file; the test stops it with SIGSTOP meanwhile, so its lease heartbeat stops too.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from vb_batch.config import ConfigError, OutputConfig, StorageOptions
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.formats import open_sink
from vb_batch.io.tables.iceberg import iceberg_catalog, iceberg_location
from vb_batch.io.lease import LeaseLostError
from vb_batch.io.sinks import schema_fingerprint

SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("depth_median_m", pa.float64(), metadata={"vb.kind": "depth", "vb.unit": "m"}),
    pa.field(ERROR_COLUMN, ERROR_TYPE),
], metadata={"vb.job": json.dumps({"tasks": ["depth"]})})
LEASE_LOST_EXIT = 3


def rows(ids: list[str]) -> pa.RecordBatch:
    values = [float(i.rsplit("-", 1)[1]) for i in ids]
    return pa.RecordBatch.from_arrays([pa.array(ids), pa.array(values, pa.float64()), pa.array([None] * len(ids),
                                       ERROR_TYPE)], schema=SCHEMA)


def ids_of(numbers) -> list[str]:
    return [f"x-{n}" for n in numbers]


@pytest.fixture(params=["sqlite", "rest"])
def out(request, tmp_path) -> dict:
    """`output` on the SQLite catalog, or on the REST catalog over SeaweedFS's table bucket."""
    if request.param == "sqlite":
        catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/wh"}
        return {"format": "iceberg", "table": "vb.labels", "catalog": catalog}
    seaweed = request.getfixturevalue("seaweed")
    s3 = request.getfixturevalue("s3")
    return {"format": "iceberg", "table": f"t{uuid.uuid4().hex[:10]}.labels", "catalog": seaweed.catalog(),
            "storage": s3.storage}


def load(out: dict):
    return iceberg_catalog(out["catalog"], StorageOptions(**out.get("storage", {}))).load_table(out["table"])


def location_files(out: dict) -> list[str]:
    """Every file under the table's location, relative to it."""
    table = load(out)
    fs, root = fsspec_filesystem(iceberg_location(table), StorageOptions(**out.get("storage", {})))
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def write_run(out: dict, run_id: str, ids: list[str], **options):
    sink = open_sink(OutputConfig(**{"mode": "resume", **out, **options}), run_id, SCHEMA, "id")
    sink.check()
    with sink.lease_held():
        done = set(sink.open().to_pylist())
        sink.write(rows([i for i in ids if i not in done]))
        sink.close(success=True, summary={"run_id": run_id, "rows": len(ids)})
    return sink


def test_bookkeeping_lives_in_the_tables_metadata(out):
    write_run(out, "run-1", ids_of(range(4)), rows_per_file=2)
    write_run(out, "run-2", ids_of(range(6)), rows_per_file=2)
    table = load(out)
    assert sorted(table.scan().to_arrow().column("id").to_pylist()) == ids_of(range(6))
    # Nothing beside the catalog's metadata and the committed data files: no `_vb/`, no marker, no records.
    files = location_files(out)
    assert all(f.startswith(("data/part-", "metadata/")) for f in files), files
    assert len([f for f in files if f.startswith("data/")]) == 3  # two files of run-1, one of run-2
    props = table.properties
    assert "vb.writer" not in props  # released
    assert props["vb.epoch"] == "2"  # each run took the epoch after the one it read
    assert json.loads(props["vb.fingerprint"])["columns"]["id"] == "string"
    assert json.loads(props["vb.last-run"]) == {"run_id": "run-2", "rows": 6}
    summaries = [s.summary for s in table.snapshots()]
    assert [(s.get("vb.run_id"), s.get("vb.commit"), s.get("vb.epoch")) for s in summaries] == [
        ("run-1", "run-1-00000", "1"), ("run-2", "run-2-00000", "2")]


def test_the_writer_lease_is_a_table_property_and_refuses_a_second_writer(out):
    from vb_batch.io.lease import LeaseHeldError

    holder = open_sink(OutputConfig(**{"mode": "resume", **out}), "run-holder", SCHEMA, "id")
    holder.check()
    with holder.lease_held():
        record = json.loads(load(out).properties["vb.writer"])
        assert record["run_id"] == "run-holder" and record["pid"] == os.getpid()
        second = open_sink(OutputConfig(**{"mode": "resume", **out}), "run-second", SCHEMA, "id")
        with pytest.raises(LeaseHeldError, match=f"being written by run run-holder .*pid {os.getpid()}"):
            with second.lease_held():
                pass
        holder.open()
        holder.write(rows(ids_of(range(2))))
        holder.close(success=True)
    assert "vb.writer" not in load(out).properties


def test_a_table_that_lost_its_fingerprint_still_refuses_another_job(out):
    """Tables of earlier versions have no `vb.fingerprint` (and a user may remove it): the rows say what they are."""
    write_run(out, "run-1", ids_of(range(3)))
    table = load(out)
    with table.transaction() as tx:
        tx.remove_properties("vb.fingerprint")
    other = SCHEMA.append(pa.field("normals", pa.binary(), metadata={"vb.kind": "normals"}))
    with pytest.raises(ConfigError, match=r"output.mode resume: .* different job.*columns only in this job: \['normals'\]"):
        open_sink(OutputConfig(**{"mode": "resume", **out}), "run-2", other, "id",
                  fingerprint=schema_fingerprint(other)).check()
    write_run(out, "run-3", ids_of(range(5)))  # the same job is still welcome, and records its fingerprint again
    assert sorted(load(out).scan().to_arrow().column("id").to_pylist()) == ids_of(range(5))
    assert "vb.fingerprint" in load(out).properties


def test_an_unreadable_writer_record_is_taken_over_after_watching_it(out, caplog):
    """What a crafted or damaged `vb.writer` holds names no holder: it is watched for the lease, then taken over."""
    write_run(out, "run-1", ids_of(range(3)))
    with load(out).transaction() as tx:
        tx.set_properties({"vb.writer": '{"vb_batch": "0.'})
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        b = write_run(out, "run-2", ids_of(range(6)), lease_seconds=1.0)
    assert "unreadable" in caplog.text and "taking over the writer lease" in caplog.text
    assert b.lease.taken_over_from == "?"
    table = load(out)
    assert sorted(table.scan().to_arrow().column("id").to_pylist()) == ids_of(range(6))
    assert "vb.writer" not in table.properties


@pytest.mark.slow  # ~2.5-5 s: a writer paused for a lease
def test_r1_a_paused_writer_is_fenced_out_and_every_id_lands_once(out, tmp_path):
    ids = ids_of(range(10))
    gate = tmp_path / "gate"
    spec = tmp_path / "writer-a.json"
    spec.write_text(json.dumps({"out": out, "ids": ids[:6], "gate": str(gate)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    writer_a = subprocess.Popen([sys.executable, __file__, str(spec)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert writer_a.stdout.readline().strip() == "about to commit", writer_a.communicate()[1][-3000:]
        os.kill(writer_a.pid, signal.SIGSTOP)  # a GC pause, a frozen VM: its heartbeat stops too
        time.sleep(1.5)  # its last heartbeat is older than its 1 s lease: B watches it instead of giving up
        b = write_run(out, "run-b", ids, lease_seconds=1.0)
        assert b.lease.taken_over_from == "run-a"
        after_b = load(out)
        assert sorted(after_b.scan().to_arrow().column("id").to_pylist()) == ids
    finally:
        gate.touch()
        os.kill(writer_a.pid, signal.SIGCONT)
        _, stderr = writer_a.communicate(timeout=120)
    assert writer_a.returncode == LEASE_LOST_EXIT, stderr[-3000:]
    # Refused by the catalog (`main` moved), then by the writer check on the table read again:
    assert "lease lost: run run-b took the table over (its writer epoch is 2, this run's 1)" in stderr, stderr[-3000:]
    table = load(out)
    assert table.current_snapshot().snapshot_id == after_b.current_snapshot().snapshot_id  # A added nothing
    seen = table.scan().to_arrow().column("id").to_pylist()
    assert sorted(seen) == ids and len(seen) == len(set(seen))
    fenced = [s.summary for s in table.snapshots() if s.summary.get("vb.fenced_run")]
    assert [(s.get("vb.fenced_run"), s.get("vb.run_id"), s.get("vb.epoch")) for s in fenced] == [("run-a", "run-b", "2")]
    # B deleted the part file A staged for its second commit, and kept the one of its first: no file is orphaned.
    referenced = sorted(posixpath.basename(task.file.file_path) for task in table.scan().plan_files())
    assert [f.removeprefix("data/") for f in location_files(out) if f.startswith("data/")] == referenced
    assert len([f for f in referenced if f.startswith("part-run-a-")]) == 1


def paused_writer(spec_path: str) -> int:
    """Writer A of the R1 case: open, commit once, and pause inside the second commit until the gate exists."""
    from pyiceberg.table import Transaction

    spec = json.loads(Path(spec_path).read_text())
    commit_transaction = Transaction.commit_transaction

    def pause_once(tx):
        Transaction.commit_transaction = commit_transaction
        print("about to commit", flush=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(spec["gate"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        return commit_transaction(tx)

    sink = open_sink(OutputConfig(**{"mode": "resume", **spec["out"], "lease_seconds": 1.0}), "run-a", SCHEMA, "id")
    sink.check()
    try:
        with sink.lease_held():
            sink.open()
            sink.write(rows(spec["ids"][:3]))
            sink.commit()  # A's first commit lands (epoch 1)
            Transaction.commit_transaction = pause_once
            sink.write(rows(spec["ids"][3:]))
            sink.commit()
    except LeaseLostError as exc:
        print(f"LeaseLostError: {exc}", file=sys.stderr, flush=True)
        return LEASE_LOST_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(paused_writer(sys.argv[1]))
