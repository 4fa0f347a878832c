"""The sink contract: what every output format (Parquet, Delta, Iceberg) must do, one suite run once per format.

Through the sink protocol (`vb_batch.io.sinks.base`): staged rows are invisible
until a commit; an output without rows yet reads with its columns;
`run.retry_failed` retires the failed rows when the sink opens; another job's
fingerprint and a second writer are refused, naming what differs and who holds
the output. Through whole jobs: the modes (error, append, overwrite, resume),
a resume that sees the committed ids, a crash mid-run or inside a commit
recovered by the next run with every id once, and the schema with its field
and job metadata read back as the job wrote it.

Format-specific checks (the formats' own readers, partitions, object stores)
stay in test_sink.py and test_lake.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PAINTED_LEGEND, write_painted_input
from output_safety import assert_each_id_once, job, lake_output, output_ids, write_images

import vb_batch
from vb_batch.config import ConfigError, OutputConfig, load_config
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE, OutputExistsError
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.formats import SINKS, open_sink
from vb_batch.io.iceberg import iceberg_catalog, iceberg_location
from vb_batch.io.lease import LeaseHeldError
from vb_batch.io.outputs import read_output
from vb_batch.io.sinks import schema_fingerprint
from vb_batch.io.sources import open_source
from vb_batch.models.identity import IdentityBackend
from vb_batch.stages import Plan

FORMATS = ["parquet", "delta", "iceberg"]

# A small output schema for the protocol-level cases: an id, a value with its meaning, the error column,
# and the job-level key every vb_batch output carries (a lake table without it is not vb_batch's).
SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("depth_median_m", pa.float64(), metadata={"vb.kind": "depth", "vb.unit": "m"}),
    pa.field(ERROR_COLUMN, ERROR_TYPE),
], metadata={"vb.job": json.dumps({"tasks": ["depth"]})})


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


@pytest.fixture
def out(fmt, tmp_path, catalog) -> dict:
    """The `output` section of a job writing `fmt` (an Iceberg table through the sqlite catalog)."""
    return lake_output(fmt, tmp_path, catalog)


def rows(ids: list[str], failed: tuple[str, ...] = ()) -> pa.RecordBatch:
    """A batch of `SCHEMA`: row `x-<n>` holds n metres; the ids in `failed` carry an error instead."""
    errors = [{"code": "decode", "message": "painted to fail"} if i in failed else None for i in ids]
    values = [None if i in failed else float(i.rsplit("-", 1)[1]) for i in ids]
    return pa.RecordBatch.from_arrays([pa.array(ids), pa.array(values, pa.float64()), pa.array(errors, ERROR_TYPE)],
                                      schema=SCHEMA)


def sink_for(out: dict, run_id: str, schema: pa.Schema = SCHEMA, **options):
    """The format's sink on `out` (`mode`, `rows_per_file`, ... in `out`), as the run core opens it."""
    return open_sink(OutputConfig(**out), run_id, schema, "id", **options)


def committed(out: dict) -> int:
    """How many commits the output's own log holds: Parquet commit records, Delta versions, Iceberg snapshots."""
    if out["format"] == "iceberg":
        return len(iceberg_catalog(out["catalog"]).load_table(out["table"]).snapshots())
    if out["format"] == "delta":
        from deltalake import DeltaTable

        return DeltaTable(out["path"]).version() + 1
    return len(list((Path(out["path"]) / "_vb" / "commits").glob("*.json")))


def data_files(out: dict) -> list[str]:
    """The part files in the output's data folder, visible or not (Iceberg: `<location>/data/`)."""
    if out["format"] == "iceberg":
        table = iceberg_catalog(out["catalog"]).load_table(out["table"])
        folder = Path(fsspec_filesystem(iceberg_location(table))[1]) / "data"
    else:
        folder = Path(out["path"])
    return sorted(p.name for p in folder.glob("part-*.parquet"))


# ---------------------------------------------------------------------------- the protocol


def test_staged_files_are_invisible_until_commit(out, fmt):
    sink = sink_for({**out, "rows_per_file": 2, "commit_every": 0}, "run1")
    sink.check()
    with sink.lease_held():
        assert sink.open() is None  # mode error: nothing to resume
        sink.write(rows(["x-1", "x-2", "x-3"]))
        assert output_ids(out) == []
        sink.commit()
        assert sorted(output_ids(out)) == ["x-1", "x-2", "x-3"]
        sink.write(rows(["x-4", "x-5"]))
        assert len(output_ids(out)) == 3
        sink.close(success=True)
    assert sorted(output_ids(out)) == ["x-1", "x-2", "x-3", "x-4", "x-5"]
    assert sink.rows_written == 5 and len(sink.files_committed) == 3  # two files of 2 rows, one of 1
    if fmt == "parquet":
        assert (Path(out["path"]) / "_SUCCESS").exists()


def test_an_output_without_rows_yet_reads_with_its_columns(out):
    sink = sink_for(out, "run1")
    sink.check()
    with sink.lease_held():
        sink.open()
        sink.close(success=True)
    table = read_output(OutputConfig(**out))
    assert table.num_rows == 0 and table.schema.names == SCHEMA.names
    assert table.schema.field("depth_median_m").metadata[b"vb.unit"] == b"m"


def test_retry_failed_retires_the_failed_rows_when_the_sink_opens(out):
    first = sink_for(out, "run1")
    first.check()
    with first.lease_held():
        first.open()
        first.write(rows([f"x-{i}" for i in range(6)], failed=("x-2", "x-5")))
        first.close(success=True)

    plain = sink_for({**out, "mode": "resume"}, "run2")
    plain.check()
    with plain.lease_held():  # a plain resume counts failed rows as done
        assert sorted(plain.open().to_pylist()) == [f"x-{i}" for i in range(6)]
        plain.close(success=True)

    retry = sink_for({**out, "mode": "resume"}, "run3", retry_failed=True)
    retry.check()
    with retry.lease_held():
        assert sorted(retry.open().to_pylist()) == ["x-0", "x-1", "x-3", "x-4"]  # the failed ones are to be redone
        assert sorted(output_ids(out)) == ["x-0", "x-1", "x-3", "x-4"]
        retry.write(rows(["x-2", "x-5"]))
        retry.close(success=True)
    table = read_output(OutputConfig(**out))
    assert sorted(table.column("id").to_pylist()) == [f"x-{i}" for i in range(6)]
    assert table.column(ERROR_COLUMN).null_count == 6


def test_retry_failed_is_only_for_resume(out):
    with pytest.raises(ConfigError, match="run.retry_failed: only with output.mode: resume"):
        sink_for({**out, "mode": "append"}, "run1", retry_failed=True).check()


@pytest.mark.parametrize("mode", ["append", "resume"])
def test_a_changed_fingerprint_is_refused(out, mode):
    sink = sink_for(out, "run1", fingerprint=schema_fingerprint(SCHEMA, "identity"))
    sink.check()
    with sink.lease_held():
        sink.open()
        sink.write(rows(["x-1"]))
        sink.close(success=True)
    other = SCHEMA.append(pa.field("normals", pa.binary(), metadata={"vb.kind": "normals"}))
    with pytest.raises(ConfigError, match=f"output.mode {mode}: .* different job.*columns only in this job: "
                                          r"\['normals'\].*model: 'identity' in the output, 'other' in this job"):
        sink_for({**out, "mode": mode}, "run2", other, fingerprint=schema_fingerprint(other, "other")).check()
    # overwrite replaces the output, whatever it held
    sink_for({**out, "mode": "overwrite"}, "run3", other, fingerprint=schema_fingerprint(other, "other")).check()


def test_a_second_writer_is_refused_naming_the_holder(out):
    holder = sink_for({**out, "mode": "resume"}, "run-holder")
    holder.check()
    with holder.lease_held():
        holder.open()
        second = sink_for({**out, "mode": "resume"}, "run-second")
        with pytest.raises(LeaseHeldError, match="run-holder"):
            with second.lease_held():
                pass
        holder.write(rows(["x-1"]))
        holder.close(success=True)
    assert output_ids(out) == ["x-1"]  # the holder committed; the second writer wrote nothing


def test_every_format_is_registered_with_its_sink(fmt):
    assert SINKS[fmt].format == fmt


# ---------------------------------------------------------------------------- whole jobs


class CrashingBackend(IdentityBackend):
    """Dies (like a killed process would stop) after a number of batches."""

    def __init__(self, crash_after):
        self.batches = 0
        self.crash_after = crash_after

    def predict(self, images, prompts, task, seeds):
        self.batches += 1
        if self.batches > self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        return list(images)


def test_modes(out, tmp_path):
    ids = write_images(tmp_path / "in.parquet", 5)
    cfg = job(tmp_path / "in.parquet", {**out, "mode": "error"})
    assert vb_batch.annotate(cfg).success
    assert_each_id_once(out, ids)
    with pytest.raises(OutputExistsError, match="output.mode"):
        vb_batch.annotate(cfg)
    vb_batch.annotate({**cfg, "output": {**cfg["output"], "mode": "append"}})
    assert sorted(output_ids(out)) == sorted(ids * 2)
    vb_batch.annotate({**cfg, "output": {**cfg["output"], "mode": "overwrite"}})
    assert_each_id_once(out, ids)
    before = committed(out)
    summary = vb_batch.annotate({**cfg, "output": {**cfg["output"], "mode": "resume"}})
    assert summary.rows_skipped == 5 and summary.rows_processed == 0
    assert committed(out) == before  # nothing new: no new commit


def test_new_rows_only_on_rerun(out, tmp_path):
    write_images(tmp_path / "in.parquet", 6)
    cfg = job(tmp_path / "in.parquet", out)
    assert vb_batch.annotate(cfg).rows_processed == 6
    ids = write_images(tmp_path / "in.parquet", 9)  # 3 new ids appended to the input
    summary = vb_batch.annotate(cfg)
    assert summary.rows_processed == 3 and summary.rows_skipped == 6
    assert_each_id_once(out, ids)


def test_crash_then_resume_gives_each_id_once(out, tmp_path):
    ids = write_images(tmp_path / "in.parquet", 30)
    cfg = job(tmp_path / "in.parquet", out)
    with pytest.raises(KeyboardInterrupt):
        vb_batch.annotate(cfg, backend=CrashingBackend(crash_after=5))
    partial = output_ids(out)
    assert 0 < len(partial) < 30 and len(set(partial)) == len(partial)  # what was written before is committed
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_skipped == len(partial)
    assert_each_id_once(out, ids)


def test_a_crash_before_the_commit_leaves_nothing_visible(out, fmt, tmp_path, monkeypatch):
    """Killed inside the commit, after the files were staged (lake tables: moved into the table) and before
    they were made visible: nothing shows, and the next run leaves every id once and no orphan file."""
    ids = write_images(tmp_path / "in.parquet", 7)
    cfg = job(tmp_path / "in.parquet", {**out, "rows_per_file": 3, "commit_every": 0})
    # Parquet: the commit record is written, the files not yet moved. Lake tables: moved, the log not written.
    sink_class = SINKS[fmt]
    step = "_apply" if fmt == "parquet" else "_commit_added"

    def die(self, *args):
        raise KeyboardInterrupt("killed inside the commit")

    monkeypatch.setattr(sink_class, step, die)
    with pytest.raises(KeyboardInterrupt):
        vb_batch.annotate(cfg)
    monkeypatch.undo()
    assert output_ids(out) == []
    if fmt != "parquet":
        assert len(data_files(out)) == 3  # moved into the table, never committed: invisible

    summary = vb_batch.annotate(cfg)  # Parquet rolls the commit forward; Delta deletes the orphans
    assert summary.success and summary.rows_processed + summary.rows_skipped == 7
    assert_each_id_once(out, ids)
    # Iceberg keeps no intent records beside the table (a table bucket takes none), so nothing names those
    # files as a dead commit's: they stay unreferenced, for Iceberg's orphan-file removal past its retention.
    # (A run that takes a lease over fences its holder out first and then deletes its files:
    # tests/test_iceberg_native.py.)
    assert len(data_files(out)) == (6 if fmt == "iceberg" else 3)


def test_schema_and_field_metadata_read_back_equal(out, tmp_path):
    """What a reader gets is what the job wrote: every column with its field metadata (units, legend, frame),
    and the job-level keys readers rely on (image column, the job)."""
    write_painted_input(tmp_path / "in.parquet")
    cfg = job(tmp_path / "in.parquet", out, tasks=["depth", "normals", "segmentation"],
              segmentation={"classes": list(PAINTED_LEGEND.names)},
              run={"progress": False, "max_error_fraction": 1.0})
    assert vb_batch.annotate(cfg).success
    config = load_config(cfg)
    source = open_source(config.input)
    expected = Plan.build(config, source.schema, source.image_column, source.uri_column).output_schema()
    schema = read_output(OutputConfig(**out)).schema
    assert schema.names == expected.names
    for ours, theirs in zip(schema, expected):
        assert (ours.metadata or {}) == (theirs.metadata or {}), ours.name
    assert schema_fingerprint(schema) == schema_fingerprint(expected)  # the same types, as vb_batch writes them
    assert schema.metadata[b"vb.image_column"] == b"image"
    assert json.loads(schema.metadata[b"vb.job"])["tasks"] == ["depth", "normals", "segmentation"]
    # Parquet's own reader keeps the meanings too (DuckDB, Spark and pyarrow read these files).
    if out["format"] == "parquet":
        first = sorted(Path(out["path"]).glob("part-*.parquet"))[0]
        assert pq.read_schema(first).field("depth").metadata == expected.field("depth").metadata
