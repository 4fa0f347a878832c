"""`vb-batch compact`: the small files of nightly appends merged in one commit, under the writer lease.

On Parquet, Delta and Iceberg outputs with one small file per append (real jobs resumed nightly, or,
where the job is not what is looked at, appends through the sink protocol):

- rows, ids and every value unchanged, files at `rows_per_file` (count ceil(rows / rows_per_file)),
  vb_batch's own metadata kept (fingerprint, job keys, the input position: a resume after it reads
  nothing twice, and one with new rows adds only those);
- readers see one consistent table throughout: read after every file step of the compaction, and
  in a loop in another thread meanwhile;
- kill -9 at each step of the commit (a child SIGKILLs itself, `crashing_job._counted`), then compact
  again: nothing lost or duplicated, nothing of the dead compaction left;
- a run holding the lease refuses the compaction (exit 3, the holder named); a compaction whose lease
  was taken over while it was paused cannot commit (the fence in the format's log);
- on SeaweedFS: a Parquet output on S3 and an Iceberg table in the REST catalog (slow).
"""

from __future__ import annotations

import json
import math
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
from output_safety import TESTS, child_env, job, lake_output, write_images

import vb_batch
from vb_batch.cli import EXIT_CONFIG, EXIT_LEASE_HELD, EXIT_OK, main
from vb_batch.config import OutputConfig
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.formats import open_sink
from vb_batch.io.lease import LeaseLostError
from vb_batch.io.outputs import open_output, read_output
from vb_batch.io.positions import COMPACTION, OPERATION_KEY, POSITION_KEY
from vb_batch.io.sinks.compaction import compact_output
from vb_batch.io.tables.iceberg import iceberg_catalog, iceberg_location

PER_FILE = 4  # 4 appends of 3 rows (12 rows in 4 small files) compacted: 3 files of 4 rows

# The output of the appends through the sink protocol: an id, a value with its meaning, the error column,
# the job-level key every vb_batch output carries.
SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("depth_median_m", pa.float64(), metadata={"vb.kind": "depth", "vb.unit": "m"}),
    pa.field(ERROR_COLUMN, ERROR_TYPE),
], metadata={"vb.job": json.dumps({"tasks": ["depth"]})})


@pytest.fixture(params=["parquet", "delta", pytest.param("iceberg", marks=pytest.mark.slow)])  # Iceberg: 1-2 s each
def fmt(request) -> str:
    return request.param


def appended_output(out: dict, appends: int = 4) -> list[str]:
    """`appends` runs of 3 rows each through the sink protocol (row `x-<n>` holds n metres): one small file each."""
    ids = []
    for n in range(appends):
        batch = [f"x-{3 * n + k}" for k in range(3)]
        sink = open_sink(OutputConfig(**{**out, "mode": "append"}), f"append-{n}", SCHEMA)
        with sink.lease_held():
            sink.open()
            sink.write(pa.RecordBatch.from_arrays(
                [pa.array(batch), pa.array([float(i[2:]) for i in batch]), pa.array([None] * 3, ERROR_TYPE)],
                schema=SCHEMA))
            sink.close(success=True)
        ids += batch
    return ids


def nightly_output(tmp_path: Path, out: dict, nights: int) -> tuple[dict, list[str]]:
    """An output that `nights` resumes of a growing input left with one small file each; (job, ids)."""
    cfg = job(tmp_path / "in.parquet", {**out, "rows_per_file": 100})
    for night in range(1, nights + 1):
        ids = write_images(tmp_path / "in.parquet", 3 * night)
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_processed == 3
    return cfg, ids


def rows_by_id(out: dict) -> list[dict]:
    """Every committed row, as plain values, in id order (compaction keeps rows, not their order)."""
    return sorted(read_output(OutputConfig(**out)).to_pylist(), key=lambda row: row["id"])


def data_files(out: dict) -> list[str]:
    """The part files in the output's data folder, referenced or not (Iceberg: `<location>/data/`)."""
    if out["format"] == "iceberg":
        table = iceberg_catalog(out["catalog"]).load_table(out["table"])
        folder = Path(fsspec_filesystem(iceberg_location(table))[1]) / "data"
    else:
        folder = Path(out["path"])
    return sorted(p.name for p in folder.glob("part-*.parquet"))


def visible_files(out: dict) -> int:
    return len(open_output(OutputConfig(**out)).dataset.files)


def compact(out: dict, **options):
    """Compact with retention 0 (everything unreferenced goes at once), as a test can wait no week."""
    return compact_output(OutputConfig(**out), **{"rows_per_file": PER_FILE, "retention_hours": 0,
                                                  "enforce_retention": False, **options})


# ---------------------------------------------------------------------------- rows, files, metadata


def test_compaction_keeps_every_row_and_merges_small_files(fmt, tmp_path, catalog):
    out = lake_output(fmt, tmp_path, catalog)
    cfg, ids = nightly_output(tmp_path, out, nights=3)
    before = rows_by_id(out)
    assert visible_files(out) == 3 and [row["id"] for row in before] == sorted(ids)

    result = compact(out, rows_per_file=6)
    assert (result.files_before, result.files_after, result.rows) == (3, 2, 9)
    assert result.files_merged == 3 and result.files_written == math.ceil(9 / 6)
    assert rows_by_id(out) == before  # every id once, every column value as it was
    assert file_rows(out) == [3, 6] and len(data_files(out)) == 2  # the small files are gone from storage

    # vb_batch's own metadata survives: the fingerprint (resume accepts the output), the job keys, and the
    # input position (this resume reads nothing); new rows are added once.
    check_metadata_kept(out)
    assert vb_batch.annotate(cfg).rows_processed == 0
    ids = write_images(tmp_path / "in.parquet", 12)
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_processed == 3
    assert [row["id"] for row in rows_by_id(out)] == sorted(ids)

    again = compact(out, rows_per_file=6)  # the two short files (3 + 3 rows) become one
    assert (again.files_before, again.files_after, again.files_merged) == (3, 2, 2)
    assert file_rows(out) == [6, 6] and [row["id"] for row in rows_by_id(out)] == sorted(ids)


def file_rows(out: dict) -> list[int]:
    dataset = open_output(OutputConfig(**out)).dataset
    return sorted(pq.read_metadata(path, filesystem=dataset.filesystem).num_rows for path in dataset.files)


def check_metadata_kept(out: dict) -> None:
    sink = open_sink(OutputConfig(**out), "probe", read_output(OutputConfig(**out)).schema)
    assert sink.input_position() is not None
    if out["format"] == "parquet":
        records = [json.loads(p.read_text()) for p in sorted((Path(out["path"]) / "_vb" / "commits").glob("*.json"))]
        compacted = [r for r in records if r.get(OPERATION_KEY) == COMPACTION]
        assert len(compacted) == 1 and "position" not in compacted[0] and compacted[0]["removes"]
        assert (Path(out["path"]) / "_vb" / "output.json").exists()
    elif out["format"] == "delta":
        from deltalake import DeltaTable

        infos = [entry for entry in DeltaTable(out["path"]).history() if entry.get(OPERATION_KEY) == COMPACTION]
        merge = [info for info in infos if "vb.job" in info]
        assert len(merge) == 1 and POSITION_KEY not in merge[0]
    else:
        table = iceberg_catalog(out["catalog"]).load_table(out["table"])
        assert {"vb.fingerprint", "vb.job", POSITION_KEY} <= set(table.properties)
        assert table.current_snapshot().summary.get(OPERATION_KEY) == COMPACTION
    assert read_output(OutputConfig(**out)).schema.field("depth").metadata[b"vb.kind"] == b"depth"  # meanings kept


# ---------------------------------------------------------------------------- readers


def test_readers_see_one_consistent_table_throughout(fmt, tmp_path, catalog, monkeypatch):
    """Read after every file step (move, delete, commit) of the compaction, and in a loop in a thread."""
    from fsspec.implementations.local import LocalFileSystem
    from pyiceberg.io.pyarrow import PyArrowFileIO

    out = lake_output(fmt, tmp_path, catalog)
    ids = appended_output(out)
    expected = rows_by_id(out)
    seen: list[int] = []

    def read_whole() -> None:
        assert rows_by_id(out) == expected
        seen.append(1)

    def reading_after(real):
        def step(*args, **kwargs):
            result = real(*args, **kwargs)
            read_whole()
            return result
        return step

    monkeypatch.setattr(LocalFileSystem, "mv", reading_after(LocalFileSystem.mv))
    monkeypatch.setattr(LocalFileSystem, "rm", reading_after(LocalFileSystem.rm))
    monkeypatch.setattr(PyArrowFileIO, "delete", reading_after(PyArrowFileIO.delete))
    sink_class = type(open_sink(OutputConfig(**out), "probe", read_output(OutputConfig(**out)).schema))
    for name in ("_commit_fenced", "_write_record"):
        if hasattr(sink_class, name):
            monkeypatch.setattr(sink_class, name, reading_after(getattr(sink_class, name)))

    stop, reads, retried, wrong = threading.Event(), [0], [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                got = [row["id"] for row in rows_by_id(out)]
            except FileNotFoundError:  # a file deleted after this reader listed it: open the output again
                retried[0] += 1
                continue
            reads[0] += 1
            if got != sorted(ids):
                wrong.append(len(got))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        compact(out)
    finally:
        stop.set()
        thread.join()
    assert not wrong, f"a reader saw {wrong} rows, not {len(ids)}"
    assert len(seen) >= 3 and reads[0] >= 1
    assert visible_files(out) == 3 and rows_by_id(out) == expected


# ---------------------------------------------------------------------------- kill -9

CHILD = """
import sys, json, crashing_job
from vb_batch.config import OutputConfig
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE
from vb_batch.io.sinks.compaction import compact_output
from fsspec.implementations.local import LocalFileSystem
from vb_batch.io.sinks import base, parquet, lake
from vb_batch.io.sinks.delta import DeltaSink
from vb_batch.io.sinks.iceberg import IcebergSink
out, point, phase, nth = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
targets = {"write_atomic": [(parquet, "write_atomic"), (lake, "write_atomic"), (base, "write_atomic")],
           "fs.mv": [(LocalFileSystem, "mv")], "fs.rm": [(LocalFileSystem, "rm")],
           "DeltaSink._commit_fenced": [(DeltaSink, "_commit_fenced")],
           "IcebergSink._commit_fenced": [(IcebergSink, "_commit_fenced")]}
for name, pairs in targets.items():
    for owner, attribute in pairs:
        setattr(owner, attribute, crashing_job._counted(name, getattr(owner, attribute), point, phase, nth))
compact_output(OutputConfig(**out), rows_per_file=4, retention_hours=0, enforce_retention=False)
"""

KILLS = [
    ("parquet", ("write_atomic", "before", 2)),  # merged files staged, no commit record yet
    ("parquet", ("write_atomic", "after", 2)),  # the commit record written, nothing moved
    ("parquet", ("fs.mv", "after", 1)),  # one merged file in place, the small files still there
    ("delta", ("fs.mv", "after", 1)),  # the intent written, one merged file moved into the table
    ("delta", ("DeltaSink._commit_fenced", "after", 1)),  # committed, the intent and staging left, no vacuum
    ("iceberg", ("IcebergSink._commit_fenced", "before", 1)),  # merged files in data/, no snapshot
    ("iceberg", ("IcebergSink._commit_fenced", "after", 1)),  # the snapshot landed, nothing expired
]


@pytest.mark.slow  # a child killed (~2 s with its imports), then compaction again
@pytest.mark.parametrize("fmt, kill", KILLS, ids=[f"{f}-{k[0]}-{k[1]}-{k[2]}" for f, k in KILLS])
def test_kill_9_mid_compaction_then_rerun_loses_and_duplicates_nothing(fmt, kill, tmp_path, catalog):
    out = lake_output(fmt, tmp_path, catalog)
    appended_output(out)
    expected = rows_by_id(out)
    argv = [sys.executable, "-c", CHILD, json.dumps(out), *map(str, kill)]
    done = subprocess.run(argv, env=child_env(), cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert rows_by_id(out) == expected  # a reader after the kill: the table before or after, whole

    result = compact(out)  # takes the dead compaction's lease over at once (its process is gone)
    assert rows_by_id(out) == expected
    assert visible_files(out) == 3 and result.files_after == 3
    assert len(data_files(out)) == 3  # nothing of the dead compaction left behind
    meta = Path(out["path"]) / "_vb" if fmt != "iceberg" else None
    if meta is not None:
        assert not (meta / "staging").exists() and not list((meta / "intents").glob("*.json"))


# ---------------------------------------------------------------------------- the lease


def cli_args(out: dict) -> list[str]:
    if out["format"] == "iceberg":
        return ["--table", out["table"], *(f"--catalog={k}={v}" for k, v in out["catalog"].items())]
    return [out["path"], "--format", out["format"]]


def test_a_run_holding_the_lease_refuses_compaction_naming_it(fmt, tmp_path, catalog, capsys):
    out = lake_output(fmt, tmp_path, catalog)
    appended_output(out, appends=2)
    holder = open_sink(OutputConfig(**out), "nightly-run-7", read_output(OutputConfig(**out)).schema)
    with holder.lease_held():
        code = main(["compact", *cli_args(out), "--rows-per-file", "4"])
        err = capsys.readouterr().err
    assert code == EXIT_LEASE_HELD and "nightly-run-7" in err, err
    assert visible_files(out) == 2
    job_yaml = tmp_path / "job.yaml"  # once the run is done: from the job's own YAML
    job_yaml.write_text(yaml.safe_dump(job(tmp_path / "in.parquet", {**out, "rows_per_file": 6})))
    assert main(["compact", "--config", str(job_yaml), "--retention-hours", "0", "--allow-short-retention"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "2 -> 1 data files, 6 rows" in captured.out and visible_files(out) == 1


def test_a_compaction_that_lost_its_lease_cannot_commit(fmt, tmp_path, catalog, monkeypatch):
    """The compaction pauses just before its commit (its lease check already passed); another writer
    watches its silent lease, takes it over and commits its epoch; the compaction resumes and is fenced off."""
    from vb_batch.io.sinks.delta import DeltaSink
    from vb_batch.io.sinks.iceberg import IcebergSink
    from vb_batch.io.sinks.parquet import ParquetSink

    out = {**lake_output(fmt, tmp_path, catalog), "lease_seconds": 0.3}
    appended_output(out, appends=3)
    expected = rows_by_id(out)
    schema = read_output(OutputConfig(**out)).schema
    taken: list[str] = []

    def take_over(sink) -> None:
        sink.lease._stop.set()  # paused: no heartbeat from here on
        sink.lease._thread.join()
        if fmt != "parquet":
            monkeypatch.setattr(sink.lease, "check", lambda: None)  # its check passed before the pause
        time.sleep(0.35)
        other = open_sink(OutputConfig(**out), "taker", schema)
        with other.lease_held():
            other._fence()
            if fmt != "iceberg":
                other._recover()
            taken.append(other.lease.taken_over_from)

    def paused_before(real, compacting):
        def step(self, *args, **kwargs):
            if compacting(self, *args, **kwargs) and not taken:
                take_over(self)
            return real(self, *args, **kwargs)
        return step

    if fmt == "parquet":
        monkeypatch.setattr(ParquetSink, "_write_record", paused_before(
            ParquetSink._write_record, lambda self, record: OPERATION_KEY in record))
    else:
        cls = DeltaSink if fmt == "delta" else IcebergSink
        monkeypatch.setattr(cls, "_commit_fenced", paused_before(
            cls._commit_fenced, lambda self, build, key, **_: bool(key) and self.run_id.startswith("compact-")))
    with pytest.raises(LeaseLostError, match="lease lost"):
        compact(out, rows_per_file=6)
    assert taken and taken[0].startswith("compact-")
    assert rows_by_id(out) == expected and visible_files(out) == 3  # nothing of the compaction landed
    monkeypatch.undo()
    assert compact(out, rows_per_file=6).files_after == 2 and rows_by_id(out) == expected  # the next one does it


# ---------------------------------------------------------------------------- a real S3 and REST catalog


@pytest.mark.slow  # SeaweedFS: S3 round trips
@pytest.mark.parametrize("fmt", ["parquet", "iceberg"])
def test_compaction_on_seaweedfs(fmt, tmp_path, seaweed, s3):
    if fmt == "parquet":
        out = {"format": "parquet", "path": s3.url("lake/labels"), "storage": s3.storage}
    else:
        out = {"format": "iceberg", "table": f"c{time.time_ns() % 10**10}.labels", "catalog": seaweed.catalog(),
               "storage": s3.storage}
    ids = appended_output(out, appends=3)
    expected = rows_by_id(out)
    result = compact_output(OutputConfig(**out), rows_per_file=6, retention_hours=0)
    assert (result.files_before, result.files_after, result.rows) == (3, 2, 9)  # 3+3+3 -> 6+3
    assert rows_by_id(out) == expected and [row["id"] for row in expected] == sorted(ids)
    assert result.files_removed >= 3  # the small files (Iceberg: and the expired snapshots' manifests)
    assert compact_output(OutputConfig(**out), rows_per_file=6).files_merged == 0


def test_a_delta_retention_below_the_tables_own_is_refused_before_any_work(tmp_path, catalog, capsys):
    out = lake_output("delta", tmp_path, catalog)
    appended_output(out, appends=2)
    assert main(["compact", out["path"], "--rows-per-file", "6", "--retention-hours", "1"]) == EXIT_CONFIG
    assert "--allow-short-retention" in capsys.readouterr().err and visible_files(out) == 2
