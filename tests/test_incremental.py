"""Incremental runs: a resume opens only what its output's input position does not call done (`vb_batch.io.positions`).

What a position lets a run skip is proven unread by making it unreadable: the done files' bytes
are overwritten in place (same size, same modification time), so a run that opened one would fail
on it, and the output would miss nothing only if it did not. Each case is checked on every kind of
input (a Parquet folder, a Delta table, an Iceberg table) and every output format; a position must
never make a run skip rows that are not in the output (a lost file, an overwrite, retry_failed, a
filter changed), and what a resume holds of the committed ids grows with what is pending.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_safety import assert_each_id_once, job, lake_output, output_ids, painting

import vb_batch
from vb_batch.config import load_config
from vb_batch.engines import core
from vb_batch.engines.resume import ResumeFilter
from vb_batch.io.sources import open_source

FILE_ROWS = 4


def rows(first: int, n: int = FILE_ROWS) -> pa.Table:
    """Rows `img-<first>` .. of painted images (row img-n paints 1 + n metres, as `assert_each_id_once` checks)."""
    return pa.table({"id": [f"img-{i}" for i in range(first, first + n)],
                     "image": pa.array([painting(i) for i in range(first, first + n)], pa.binary())})


class Input:
    """An input of one kind that grows file by file (Parquet folder), version by version (Delta), snapshot by
    snapshot (Iceberg); `spoil` makes its data files unreadable without changing what a listing says of them."""

    def __init__(self, kind: str, tmp_path: Path):
        self.kind, self.root = kind, tmp_path / "in"
        self.catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/input-catalog.db",
                        "warehouse": f"file://{tmp_path}/input-warehouse"}
        self.added = 0

    def add(self, table: pa.Table) -> None:
        if self.kind == "parquet":
            self.root.mkdir(exist_ok=True)
            pq.write_table(table, self.root / f"f{self.added:03d}.parquet")
        elif self.kind == "delta":
            import deltalake

            deltalake.write_deltalake(str(self.root), table, mode="append")
        else:
            from vb_batch.io.iceberg import iceberg_catalog

            catalog = iceberg_catalog(self.catalog)
            catalog.create_namespace_if_not_exists("src")
            catalog.create_table_if_not_exists("src.images", schema=table.schema).append(table)
        self.added += 1

    @property
    def section(self) -> dict:
        if self.kind == "iceberg":
            return {"format": "iceberg", "table": "src.images", "catalog": self.catalog}
        return {"path": str(self.root)}

    def data_files(self) -> list[Path]:
        found = self.root if self.kind != "iceberg" else Path(self.catalog["warehouse"][len("file://"):])
        return sorted(p for p in found.rglob("*.parquet") if "metadata" not in p.parts)

    def spoil(self, files: list[Path]) -> None:
        """Zero each file's data pages in place: same size, same modification time, the footer (schema,
        row groups) kept, so only a reader of its rows fails (a Parquet folder's schema comes from a footer)."""
        for path in files:
            stat = path.stat()
            data = path.read_bytes()
            footer = int.from_bytes(data[-8:-4], "little") + 8
            path.write_bytes(data[:4] + b"\0" * (len(data) - 4 - footer) + data[-footer:])
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def incremental_job(inp: Input, output: dict, **sections) -> dict:
    cfg = job("", output, **sections)
    cfg["input"] = inp.section
    return cfg


# Every kind of input into a Parquet output, and a Parquet folder into every output format.
CASES = [("parquet", "parquet"), ("delta", "parquet"), ("iceberg", "parquet"), ("parquet", "delta"),
         ("parquet", "iceberg")]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fmt"), CASES)
def test_a_resume_reads_only_what_is_new_on_every_input_and_output(kind, fmt, tmp_path, catalog):
    inp = Input(kind, tmp_path)
    out = lake_output(fmt, tmp_path, catalog)
    cfg = incremental_job(inp, out)
    for n in range(3):
        inp.add(rows(n * FILE_ROWS))
    first = vb_batch.annotate(cfg)
    assert first.rows_ok == 12 and first.files_unread == 0
    done = inp.data_files()
    inp.add(rows(12))
    inp.spoil(done)  # had the resume opened one of them, it would fail on it

    second = vb_batch.annotate(cfg)
    assert second.success and second.rows_ok == FILE_ROWS and second.rows_failed == 0
    assert second.files_unread == 3 and second.rows_unread == 12 and second.rows_skipped == 12
    assert second.rows_read == 16 and inp.kind in second.input_position.replace("listing", "parquet")
    assert_each_id_once(out, [f"img-{i}" for i in range(16)])

    third = vb_batch.annotate(cfg)  # nothing new: nothing opened, the model not loaded, no commit
    assert third.rows_processed == 0 and third.files_unread == 4 and "nothing to do" in third.message
    assert_each_id_once(out, [f"img-{i}" for i in range(16)])


def test_a_resume_looks_up_only_the_pending_ids_among_the_committed(tmp_path, monkeypatch):
    inp = Input("parquet", tmp_path)
    for n in range(3):
        inp.add(rows(n * FILE_ROWS))
    out = {"path": str(tmp_path / "out")}
    vb_batch.annotate(incremental_job(inp, out))
    inp.add(rows(12))
    held = []
    original = ResumeFilter.__init__
    monkeypatch.setattr(ResumeFilter, "__init__", lambda self, done, *a, **k: (held.append(len(done)),
                                                                              original(self, done, *a, **k))[1])
    vb_batch.annotate(incremental_job(inp, out))
    assert held == [0]  # the new file's ids are none of the 12 committed ones: the filter holds no id


def test_a_rewritten_file_is_read_by_its_ids_first_and_only_its_new_rows_labelled(tmp_path):
    inp = Input("parquet", tmp_path)
    inp.add(rows(0))
    out = {"path": str(tmp_path / "out")}
    cfg = incremental_job(inp, out)
    vb_batch.annotate(cfg)
    # The same file, rewritten with its rows in one row group and two new rows in a second.
    path = inp.data_files()[0]
    with pq.ParquetWriter(path, rows(0).schema) as writer:
        writer.write_table(rows(0))
        writer.write_table(rows(4, 2))
    again = vb_batch.annotate(cfg)
    assert again.files_unread == 0 and again.rows_ok == 2 and again.rows_skipped == FILE_ROWS
    assert_each_id_once(out, [f"img-{i}" for i in range(6)])

    # Where the units come from: the row group whose ids are all committed is read by its id column only.
    config = load_config(cfg)
    source = open_source(config.input)
    source.done_ids = pa.array([f"img-{i}" for i in range(4)])
    units = source.units()
    assert [u["row_group"] for u in units] == [1] and source.pruned_rows == FILE_ROWS


def test_a_lost_output_file_voids_the_position_and_its_rows_are_labelled_again(tmp_path):
    inp = Input("parquet", tmp_path)
    for n in range(2):
        inp.add(rows(n * FILE_ROWS))
    out = {"path": str(tmp_path / "out"), "rows_per_file": 4, "commit_every": 4}
    cfg = incremental_job(inp, out)
    vb_batch.annotate(cfg)
    lost = sorted((tmp_path / "out").glob("part-*.parquet"))[0]
    lost_ids = pq.read_table(lost).column("id").to_pylist()
    lost.unlink()  # deleted outside vb_batch: the next run's recovery drops it from the output
    again = vb_batch.annotate(cfg)
    assert again.files_unread == 0 and again.rows_ok == len(lost_ids)
    assert_each_id_once(out, [f"img-{i}" for i in range(8)])


@pytest.mark.parametrize("change", ["retry_failed", "filter", "overwrite"])
def test_what_a_position_does_not_speak_for_is_read_in_full(change, tmp_path):
    inp = Input("parquet", tmp_path)
    for n in range(2):
        inp.add(rows(n * FILE_ROWS))
    out = {"path": str(tmp_path / "out")}
    cfg = incremental_job(inp, out)
    vb_batch.annotate(cfg)
    if change == "retry_failed":
        cfg["run"] = {**cfg["run"], "retry_failed": True}
    elif change == "filter":
        cfg["input"] = {**cfg["input"], "filter": "id != 'img-0'"}
    else:
        vb_batch.annotate({**cfg, "output": {**out, "mode": "overwrite"}, "input": {**cfg["input"],
                                                                                 "filter": "id != 'img-0'"}})
    summary = vb_batch.annotate(cfg)
    assert summary.files_unread == 0, summary.input_position
    expected = [f"img-{i}" for i in range(8)]
    if change == "filter":
        assert summary.rows_read == 7 and summary.rows_skipped == 7
    elif change == "overwrite":  # the overwrite kept 7 rows; the resume reads both files and adds img-0
        assert summary.rows_ok == 1
    assert_each_id_once(out, expected)


def test_a_position_voided_while_the_run_waited_for_the_lease_makes_it_read_everything(tmp_path):
    inp = Input("parquet", tmp_path)
    for n in range(2):
        inp.add(rows(n * FILE_ROWS))
    out = {"path": str(tmp_path / "out")}
    cfg = incremental_job(inp, out)
    vb_batch.annotate(cfg)
    inp.add(rows(8))
    run = core.start_run(load_config(cfg), "local")
    assert len(run.source.unread) == 2
    # Meanwhile another run held the output and removed rows (a file lost and dropped by its recovery).
    part = run.sink.committed_files()[0]
    removed = pq.read_table(tmp_path / "out" / part).column("id").to_pylist()
    run.sink._fence()  # the next record's number
    run.sink._write_record({"files": [], "removes": [part]})
    with run.sink.lease_held():
        done = core.check_position(run, run.sink.open(among=run.ids))
    assert not run.source.unread and run.summary.files_unread == 0 and len(run.source.units()) == 3
    # The whole input's ids looked up: those still committed (not the removed file's)
    assert sorted(done.to_pylist()) == sorted(f"img-{i}" for i in range(8) if f"img-{i}" not in removed)


def test_a_killed_run_records_no_position_and_the_next_reads_what_is_pending(tmp_path):
    inp = Input("parquet", tmp_path)
    inp.add(rows(0))
    out = {"path": str(tmp_path / "out")}
    cfg = incremental_job(inp, out)
    vb_batch.annotate(cfg)
    inp.add(rows(4))
    inp.add(rows(8))

    class Boom(Exception):
        pass

    calls = []

    def after(summary):
        calls.append(summary)

    original = core.input_read
    core.input_read = lambda run: (_ for _ in ()).throw(Boom())  # the run "dies" as it would record its position
    try:
        with pytest.raises(Boom):
            vb_batch.annotate(cfg)
    finally:
        core.input_read = original
    # Its rows were committed (close commits what was written), its position was not: the next run reads
    # the two new files again by their ids and labels nothing twice.
    again = vb_batch.annotate(cfg)
    assert again.files_unread == 1 and again.rows_ok == 0 and again.rows_skipped == 12
    assert sorted(output_ids(out)) == sorted(f"img-{i}" for i in range(12))


@pytest.mark.slow
def test_incremental_on_an_s3_store_reads_only_the_new_object(s3, tmp_path):
    """SeaweedFS: the Parquet prefix's objects are told apart by their ETags; a Delta output on S3."""
    for n in range(3):
        s3.put(f"in/f{n}.parquet", _parquet_bytes(rows(n * FILE_ROWS)))
    out = {"format": "delta", "path": s3.url("out"), "storage": s3.storage}
    cfg = job(s3.url("in"), out)
    cfg["input"]["storage"] = s3.storage
    assert vb_batch.annotate(cfg).rows_ok == 12
    s3.put("in/f3.parquet", _parquet_bytes(rows(12)))
    # Rewritten with one more row: a new ETag; read by its ids, its committed rows skipped.
    s3.put("in/f0.parquet", _parquet_bytes(pa.concat_tables([rows(0), rows(16, 1)])))
    again = vb_batch.annotate(cfg)
    assert again.files_unread == 2 and again.rows_ok == FILE_ROWS + 1 and again.rows_skipped == 12
    assert_each_id_once(out, [f"img-{i}" for i in range(17)])


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.slow
def test_every_engine_skips_what_the_position_calls_done(engine, tmp_path):
    inp = Input("parquet", tmp_path)
    for n in range(2):
        inp.add(rows(n * FILE_ROWS))
    out = {"path": str(tmp_path / "out")}
    cfg = incremental_job(inp, out, engine={"kind": engine, "cpu_batch_rows": 4})
    vb_batch.annotate(cfg)
    done = inp.data_files()
    inp.add(rows(8))
    inp.spoil(done)
    again = vb_batch.annotate(cfg)
    assert again.files_unread == 2 and again.rows_ok == FILE_ROWS
    assert_each_id_once(out, [f"img-{i}" for i in range(12)])
