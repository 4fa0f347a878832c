"""A crash at any point leaves an output that the next run completes, with every id exactly once.

- ids in any column survive a kill -9 after a commit and a resume;
- damaged metadata (empty or truncated records and markers, leftover temporary files) is dropped with
  a warning, and the repaired marker guards the output again;
- a kill -9 in the middle of a commit on S3, and as an overwrite or a `retry_failed` run starts, is
  completed by the next run;
- a kill -9 loop at random points of writing and committing (Parquet, Delta), resumed until done.

Children are real processes (`crashing_job.py`) that SIGKILL themselves at a named call. Run with
`-s` to see the kill loop's counts.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from deltalake import DeltaTable
from output_safety import (
    assert_each_id_once,
    images_table,
    job,
    lake_output,
    meta_dir,
    output_ids,
    painting,
    parquet_bytes,
    run_child,
    write_images,
)

import vb_batch
from vb_batch.config import ConfigError, OutputConfig, StorageOptions
from vb_batch.io import iceberg
from vb_batch.io.outputs import read_output
from vb_batch.io.sinks.iceberg import FINGERPRINT_PROPERTY, WRITER_PROPERTY


@pytest.mark.slow  # 1-2 s each: a child killed, then a resume
@pytest.mark.parametrize("id_position, fmt", [("first", "parquet"), ("middle", "delta"), ("last", "iceberg")])
def test_ids_in_any_column_survive_kill_9_and_resume_exactly_once(id_position, fmt, tmp_path, catalog):
    ids = write_images(tmp_path / "in.parquet", 24, id_position)
    out = lake_output(fmt, tmp_path, catalog)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job(tmp_path / "in.parquet", out)))
    # Killed right after its second commit landed in the table (or the Parquet records).
    point = "ParquetSink._apply" if fmt == "parquet" else "TableSink._commit_files"
    done = run_child(job_path, (point, "after", 2))
    assert done.returncode == -signal.SIGKILL, done.stderr
    committed = output_ids(out)
    assert len(committed) == 16 and len(set(committed)) == 16  # two commits of 8 rows, each row once
    summary = vb_batch.annotate(str(job_path))
    assert summary.success and summary.rows_skipped == 16 and summary.rows_processed == 8
    table = assert_each_id_once(out, ids)
    assert table.schema.names.index("id") == {"first": 0, "middle": 1, "last": 2}[id_position]


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_damaged_metadata_is_dropped_with_a_warning_and_resume_completes(fmt, tmp_path, catalog, caplog):
    write_images(tmp_path / "in.parquet", 12)
    out = lake_output(fmt, tmp_path, catalog)
    assert vb_batch.annotate(job(tmp_path / "in.parquet", out)).success
    ids = write_images(tmp_path / "in.parquet", 20)  # 8 new rows for the resume to do
    if fmt == "iceberg":
        check_a_damaged_iceberg_writer_record_is_taken_over(out, tmp_path, ids, caplog)
        return
    meta = meta_dir(out)
    # What a crash in the middle of writing metadata could leave (a full disk, a power cut):
    (meta / "output.json").write_bytes(b"")
    (meta / "output.json.5e6f7a8b.tmp").write_bytes(b'{"vb_batch": "0.')
    (meta / "lease.json").write_bytes(b"")
    if fmt == "parquet":
        commits = meta / "commits"
        first = json.loads(min(commits.glob("c*.json")).read_text())
        staged = meta / "staging" / "deadrun"
        staged.mkdir(parents=True)
        for n in range(2):  # a dead run's staged files, which its damaged records name
            (staged / f"part-deadrun-{n:05d}.parquet").write_bytes((Path(out["path"]) / first["files"][0]).read_bytes())
        (commits / "c000000000090-deadrun.json").write_bytes(b"")
        record = json.dumps({"run_id": "deadrun", "files": ["part-deadrun-00000.parquet", "part-deadrun-00001.parquet"]})
        (commits / "c000000000091-deadrun.json").write_text(record[: len(record) // 2])
        (commits / "c000000000092-deadrun.json.1a2b3c4d.tmp").write_text(record[:10])
    else:  # delta
        intents = meta / "intents"
        intents.mkdir(exist_ok=True)
        (intents / "deadrun-00000.json").write_bytes(b"")
        (intents / "deadrun-00001.json").write_text('{"key": "deadrun-00001", "files": ["/nowh')
        (intents / "deadrun-00002.json.1a2b3c4d.tmp").write_text('{"key"')

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        # The unreadable lease names no holder: it is taken over after the run watched it for its own lease.
        summary = vb_batch.annotate(job(tmp_path / "in.parquet", {**out, "lease_seconds": 1.0}))
    assert summary.success and summary.rows_skipped == 12 and summary.rows_processed == 8
    assert_each_id_once(out, ids)
    warnings = caplog.text
    assert "taking over the writer lease" in warnings and "unreadable" in warnings
    assert "damaged" in warnings
    if fmt == "parquet":
        assert "removing damaged commit record" in warnings and not (meta / "staging").exists()
        assert not list((meta / "commits").glob("*deadrun*"))
        for path in (meta / "commits").glob("*.json"):
            json.loads(path.read_text())  # every record left is whole
    else:
        assert not (meta / "intents").exists() or not list((meta / "intents").iterdir())
    assert not list(meta.rglob("*.tmp"))  # leftover temporary files are cleared
    assert json.loads((meta / "output.json").read_text())["fingerprint"]["columns"]["id"] == "string"
    assert not (meta / "lease.json").exists()  # released at the end
    # The repaired marker guards the output again: another job's columns are refused.
    with pytest.raises(ConfigError, match="vb.encoding"):
        vb_batch.annotate(job(tmp_path / "in.parquet", {**out, "encoding": "array"}))


def check_a_damaged_iceberg_writer_record_is_taken_over(out: dict, tmp_path: Path, ids: list, caplog) -> None:
    """An Iceberg output keeps its metadata in the table's own, committed atomically through the catalog
    (`vb_batch.io.sinks.iceberg`): no half-written file can be left, but a damaged or crafted writer record
    can. It is taken over after the run watched it, and the fingerprint still guards the output."""
    table = iceberg.iceberg_catalog(out["catalog"]).load_table(out["table"])
    with table.transaction() as tx:
        tx.set_properties({WRITER_PROPERTY: '{"token": "deadrun", "heartb'})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(job(tmp_path / "in.parquet", {**out, "lease_seconds": 1.0}))
    assert summary.success and summary.rows_skipped == 12 and summary.rows_processed == 8
    assert_each_id_once(out, ids)
    assert "taking over the writer lease" in caplog.text and "unreadable" in caplog.text
    properties = iceberg.iceberg_catalog(out["catalog"]).load_table(out["table"]).properties
    assert WRITER_PROPERTY not in properties  # released at the end
    assert json.loads(properties[FINGERPRINT_PROPERTY])["columns"]["id"] == "string"
    with pytest.raises(ConfigError, match="vb.encoding"):
        vb_batch.annotate(job(tmp_path / "in.parquet", {**out, "encoding": "array"}))


@pytest.mark.slow  # ~2.5 s: a child killed mid-commit on S3
@pytest.mark.parametrize("fmt, point, repair", [
    ("parquet", "ParquetSink._apply", "rolling forward interrupted commit"),  # record written, files not moved
    ("delta", "DeltaSink._commit_added", "moved into the table by a run that died"),  # files moved, log not written
], ids=["parquet", "delta"])
def test_a_kill_9_on_s3_mid_commit_is_completed_by_the_next_run(fmt, point, repair, s3, tmp_path, caplog):
    ids = [f"img-{i}" for i in range(20)]
    s3.put(f"crash-{fmt}/in.parquet", parquet_bytes(images_table(ids)))
    out = {"format": fmt, "path": s3.url(f"crash-{fmt}/labels"), "storage": s3.storage}
    cfg = job(s3.url(f"crash-{fmt}/in.parquet"), out)
    cfg["input"]["storage"] = s3.storage
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(cfg))
    child = run_child(job_path, (point, "before", 2))  # in the middle of the second commit
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    storage = StorageOptions(**s3.storage)
    seen = read_output(OutputConfig(**out), columns=["id"], storage=storage).column("id").to_pylist()
    assert sorted(seen) == sorted(ids[:8])  # the first commit, and nothing of the second
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(cfg)
    assert summary.success and repair in caplog.text and "taking over the writer lease" in caplog.text
    table = read_output(OutputConfig(**out), columns=["id"], storage=storage)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    keys = s3.keys(f"crash-{fmt}/labels/")
    assert not any("/_vb/staging/" in k or "/_vb/intents/" in k or k.endswith("/_vb/lease.json") for k in keys), keys
    if fmt == "parquet":
        assert f"crash-{fmt}/labels/_SUCCESS" in keys
    else:  # deltalake's own reader agrees: the log names no missing file
        from vb_batch.io.filesystems import delta_storage_options

        delta_options = delta_storage_options(out["path"], storage)
        assert DeltaTable(out["path"], storage_options=delta_options).to_pyarrow_table().num_rows == len(ids)


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
@pytest.mark.parametrize("mode", ["overwrite", "retry_failed"])
def test_a_kill_9_as_overwrite_or_retry_starts_leaves_an_output_the_next_run_completes(mode, fmt, tmp_path):
    """Killed right after the record that removes the old files (an overwrite's reset, retry_failed's
    rewrite) and before they are gone: those files are still vb_batch's, and the next run finishes the job."""
    images = tmp_path / "imgs"
    images.mkdir()
    ids = [f"img-{i}" for i in range(12)]
    for i in range(12):
        if i not in (2, 9):
            (images / f"{ids[i]}.png").write_bytes(painting(i))
    pq.write_table(pa.table({"id": ids, "uri": [str(images / f"{i}.png") for i in ids]}), tmp_path / "in.parquet")
    out = {"format": fmt, "path": str(tmp_path / "labels")}
    cfg = job(tmp_path / "in.parquet", out, run={"progress": False, "max_error_fraction": 1.0})
    assert vb_batch.annotate(cfg).rows_failed == 2
    for i in (2, 9):
        (images / f"{ids[i]}.png").write_bytes(painting(i))
    if mode == "overwrite":
        child_cfg = {**cfg, "output": {**cfg["output"], "mode": "overwrite"}}
    else:
        child_cfg = {**cfg, "run": {**cfg["run"], "retry_failed": True}}
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(child_cfg))
    # Parquet: before the files of the reset / rewrite record are removed; Delta: its first commit's files moved.
    point = "ParquetSink._apply" if fmt == "parquet" else "DeltaSink._commit_added"
    child = run_child(job_path, (point, "before", 1))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert len(set(output_ids(out))) == len(output_ids(out))
    summary = vb_batch.annotate({**cfg, "run": {**cfg["run"], "retry_failed": True}})
    assert summary.success, summary.message
    assert_each_id_once(out, ids)


# Where a child may die, per format, and how often each point is called by one run over the whole
# input below (60 rows, 4 per file, a commit every 8): n is drawn from 1..that count, scaled down by
# the share of rows already committed.
KILL_POINTS = {
    "parquet": {"write_atomic": 11, "ParquetSink._apply": 8, "fs.mv": 15, "Sink.write": 15, "Sink.stage": 15,
                "Lease.acquire": 1},
    "delta": {"write_atomic": 10, "fs.mv": 15, "Sink.write": 15, "Sink.stage": 15, "TableSink._commit_files": 8,
              "DeltaSink._commit_added": 8, "Lease.acquire": 1},
}
ROWS = 60
# What a resumed child says it repaired (its warnings), counted for the issue note.
REPAIRS = {"rolled forward": "rolling forward interrupted commit", "lease taken over": "taking over the writer lease",
           "uncommitted files removed": "moved into the table by a run that died"}


def check_after_kill(fmt: str, out: Path) -> int:
    """What a reader sees after a kill: a readable output, no id twice, whole records. Its row count."""
    ids = output_ids(str(out))
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)
    for record in (out / "_vb").rglob("*.json") if (out / "_vb").exists() else []:
        json.loads(record.read_text())  # never half a record
    if fmt == "delta" and (out / "_delta_log").exists():
        assert DeltaTable(str(out)).to_pyarrow_table(columns=["id"]).num_rows == len(ids)  # the log names no missing file
    return len(ids)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_at_random_points_then_resume_gives_every_id_once(tmp_path):
    """Every (point, before/after) of each format is killed at least once, at a random call (seed 17).

    Children resume each other's output until one finishes; then the next round starts with an
    overwrite of that output (so the overwrite's reset is killed too), again resumed until one finishes.
    """
    rng = random.Random(17)
    ids = write_images(tmp_path / "in.parquet", ROWS)
    kills: collections.Counter = collections.Counter()
    repairs: collections.Counter = collections.Counter()
    rounds = children = 0
    for fmt, points in KILL_POINTS.items():
        deck = [(point, phase) for point in sorted(points) for phase in ("before", "after")]
        rng.shuffle(deck)
        out = tmp_path / fmt
        jobs = {}
        for mode in ("overwrite", "resume"):
            jobs[mode] = tmp_path / f"{fmt}-{mode}.yaml"
            jobs[mode].write_text(yaml.safe_dump(job(tmp_path / "in.parquet", {"format": fmt, "path": str(out), "mode": mode})))
        first_round = True
        while deck:
            rounds += 1
            job_path = jobs["resume" if first_round else "overwrite"]
            first_round, rows = False, 0
            while True:  # children resume each other's output until one is not killed
                kill = None
                if deck:  # a point that is not reached this time stays on the deck for the next round
                    point, phase = deck[0]
                    kill = (point, phase, rng.randint(1, max(1, round(points[point] * (ROWS - rows) / ROWS))))
                child = run_child(job_path, kill)
                job_path = jobs["resume"]
                children += 1
                assert children < 120, "the loop does not converge"
                for what, text in REPAIRS.items():
                    repairs[fmt, what] += child.stderr.count(text)
                if child.returncode == -signal.SIGKILL:
                    deck.pop(0)
                    kills[fmt, f"{kill[0]}:{kill[1]}"] += 1
                    rows = check_after_kill(fmt, out)
                    print(f"{fmt} round {rounds}: killed at {kill[0]} {kill[1]} call {kill[2]}; {rows} rows committed")
                    continue
                assert child.returncode == 0, (kill, child.stderr[-2000:])
                print(f"{fmt} round {rounds}: finished ({'no kill' if kill is None else f'{kill} not reached'})")
                break
            assert_each_id_once({"format": fmt, "path": str(out)}, ids)
            if fmt == "parquet":
                assert (out / "_SUCCESS").exists()
            else:
                assert sorted(DeltaTable(str(out)).to_pyarrow_table(columns=["id"]).column("id").to_pylist()) == sorted(ids)
            assert not (out / "_vb" / "staging").exists() and not (out / "_vb" / "lease.json").exists()
    print("\nkills per point and format:")
    for (fmt, point), n in sorted(kills.items()):
        print(f"  {fmt:8s} {point:32s} {n}")
    per_format = collections.Counter()
    for (fmt, _), n in kills.items():
        per_format[fmt] += n
    print(f"total kills: {sum(kills.values())} ({dict(per_format)}) in {children} children, {rounds} rounds")
    print("repairs by the resumed runs: " + ", ".join(f"{fmt} {what}: {n}" for (fmt, what), n in sorted(repairs.items())))
    assert sum(kills.values()) >= 20 and len(kills) == sum(2 * len(points) for points in KILL_POINTS.values())
