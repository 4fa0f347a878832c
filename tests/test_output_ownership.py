"""vb_batch writes only into outputs it owns, and touches nothing it did not write.

A folder or table holding files vb_batch did not write (another dataset's parts, a Delta or Iceberg
table of someone else) is refused in every mode, on local disk and on S3; with
`output.allow_foreign_files` the job writes next to them and never changes them. Metadata naming files
outside the output's own part files (a hand-edited, copied or hostile `_vb/`) moves and deletes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from output_safety import (
    assert_each_id_once,
    cli,
    digests,
    images_table,
    job,
    output_ids,
    parquet_bytes,
    s3_objects,
    write_images,
)

import vb_batch
from vb_batch.config import StorageOptions
from vb_batch.io import iceberg
from vb_batch.io.outputs import read_output


def foreign_folder(out: Path) -> dict[str, str]:
    """Another dataset's part files, a stray file and a nested one in `out`; their digests."""
    out.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        pq.write_table(pa.table({"id": [f"theirs-{part}-{i}" for i in range(3)], "value": [1.5, 2.5, 3.5]}),
                       out / f"part-{part:05d}-7c1f0e2a.snappy.parquet")
    (out / "README.txt").write_text("not vb_batch's\n")
    (out / "sub").mkdir()
    (out / "sub" / "blob.bin").write_bytes(os.urandom(64))
    return digests(out)


@pytest.mark.parametrize("mode", ["append", "resume", "overwrite", "error"])
def test_a_folder_of_foreign_files_is_refused_in_every_mode(mode, tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 5)
    before = foreign_folder(tmp_path / "out")
    code, line = cli(job(tmp_path / "in.parquet", {"path": str(tmp_path / "out"), "mode": mode}), tmp_path, capsys)
    assert code == 2, line
    assert "output.path" in line and "allow_foreign_files" in line and "part-00000-7c1f0e2a.snappy.parquet" in line
    assert digests(tmp_path / "out") == before  # nothing changed, nothing added (no _vb/ either)


def test_allowed_foreign_files_are_written_next_to_and_never_touched(tmp_path, capsys):
    ids = write_images(tmp_path / "in.parquet", 5)
    before = foreign_folder(tmp_path / "out")
    out = {"path": str(tmp_path / "out"), "allow_foreign_files": True}
    expected_rows = {"error": 5, "resume": 5, "overwrite": 5, "append": 10}
    for mode, rows in expected_rows.items():
        code, line = cli(job(tmp_path / "in.parquet", {**out, "mode": mode}), tmp_path, capsys)
        assert code == 0, (mode, line)
        now = digests(tmp_path / "out")
        assert {k: now.get(k) for k in before} == before, mode
        seen = output_ids(str(tmp_path / "out"))
        assert len(seen) == rows and set(seen) == set(ids), mode  # only vb_batch's rows, never theirs


def test_a_delta_table_vb_batch_did_not_write_is_refused(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 4)
    theirs = str(tmp_path / "theirs")
    write_deltalake(theirs, pa.table({"id": ["a", "b"], "score": [0.1, 0.2]}))
    write_deltalake(theirs, pa.table({"id": ["c"], "score": [0.3]}), mode="append")
    before = digests(tmp_path / "theirs")
    for mode in ("overwrite", "append", "resume", "error"):
        code, line = cli(job(tmp_path / "in.parquet", {"path": theirs, "format": "delta", "mode": mode}), tmp_path, capsys)
        assert code == 2 and "output.path" in line and "allow_foreign_files" in line, (mode, line)
    assert digests(tmp_path / "theirs") == before
    table = DeltaTable(theirs)
    assert table.version() == 1 and sorted(table.to_pyarrow_table().column("id").to_pylist()) == ["a", "b", "c"]


def test_a_plain_folder_is_no_delta_output_either(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 4)
    before = foreign_folder(tmp_path / "out")
    code, line = cli(job(tmp_path / "in.parquet", {"path": str(tmp_path / "out"), "format": "delta", "mode": "overwrite"}),
                     tmp_path, capsys)
    assert code == 2 and "allow_foreign_files" in line, line
    assert digests(tmp_path / "out") == before


def test_an_iceberg_table_vb_batch_did_not_write_is_refused(tmp_path, catalog, capsys):
    write_images(tmp_path / "in.parquet", 4)
    cat = iceberg.iceberg_catalog(catalog)
    cat.create_namespace("vb")
    theirs = pa.table({"id": ["a", "b"], "score": [0.1, 0.2]})
    cat.create_table("vb.theirs", schema=theirs.schema).append(theirs)
    before = digests(tmp_path / "warehouse")
    for mode in ("overwrite", "append", "resume"):
        code, line = cli(job(tmp_path / "in.parquet", {"format": "iceberg", "table": "vb.theirs", "catalog": catalog,
                                                       "mode": mode}), tmp_path, capsys)
        assert code == 2 and "output.table" in line and "allow_foreign_files" in line, (mode, line)
    assert digests(tmp_path / "warehouse") == before
    table = iceberg.iceberg_catalog(catalog).load_table("vb.theirs")
    assert len(table.snapshots()) == 1 and sorted(table.scan().to_arrow().column("id").to_pylist()) == ["a", "b"]


def test_foreign_files_on_s3_are_refused_or_left_alone(s3, tmp_path, capsys):
    s3.put("fin/in.parquet", parquet_bytes(images_table([f"img-{i}" for i in range(4)])))
    s3.put("fout/part-00000-theirs.parquet", parquet_bytes(pa.table({"id": ["theirs-0"], "value": [1.0]})))
    s3.put("fout/notes.txt", b"theirs")
    before = s3_objects(s3, "fout/")
    cfg = job(s3.url("fin/in.parquet"), {"path": s3.url("fout"), "mode": "resume", "storage": s3.storage})
    cfg["input"]["storage"] = s3.storage
    code, line = cli(cfg, tmp_path, capsys)
    assert code == 2 and "allow_foreign_files" in line and "part-00000-theirs.parquet" in line, line
    assert s3_objects(s3, "fout/") == before
    cfg["output"]["allow_foreign_files"] = True
    for mode in ("resume", "overwrite"):
        cfg["output"]["mode"] = mode
        assert cli(cfg, tmp_path, capsys)[0] == 0
        after = s3_objects(s3, "fout/")
        assert {k: after.get(k) for k in before} == before, mode
        seen = read_output(s3.url("fout"), columns=["id"], storage=StorageOptions(**s3.storage)).column("id").to_pylist()
        assert sorted(seen) == [f"img-{i}" for i in range(4)], mode


def test_metadata_naming_files_outside_the_pattern_moves_and_deletes_nothing(tmp_path, caplog):
    """Records are data: one that names another file than a part file of this output (a hand-edited,
    copied or hostile `_vb/`) is not vb_batch's, and nothing it names is moved or deleted."""
    ids = write_images(tmp_path / "in.parquet", 8)
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "theirs").mkdir()
    pq.write_table(pa.table({"id": ["theirs"]}), tmp_path / "theirs" / "part-00000-theirs.parquet")
    before = digests(tmp_path)
    for fmt in ("parquet", "delta"):
        out = tmp_path / f"{fmt}-labels"
        cfg = job(tmp_path / "in.parquet", {"format": fmt, "path": str(out)})
        assert vb_batch.annotate(cfg).success
        meta = out / "_vb"
        if fmt == "parquet":
            hostile = [
                {"files": [], "removes": ["../notes.txt", "../in.parquet", str(tmp_path / "notes.txt")]},
                {"files": [], "removes": ["part-x/../../notes.txt"]},
                {"files": ["part-00000-theirs.parquet"], "staging": "../../../theirs"},  # would move their file in
                {"files": [], "removes": [], "reset": True, "staging": "../.."},
                {"files": "part-0.parquet", "removes": 3},
            ]
            for n, record in enumerate(hostile):
                (meta / "commits" / f"c{900 + n:012d}-evil.json").write_text(json.dumps({"run_id": "evil", **record}))
        else:
            (meta / "intents").mkdir(exist_ok=True)
            for n, target in enumerate([str(tmp_path / "notes.txt"), str(tmp_path / "in.parquet"),
                                        str(tmp_path / "theirs" / "part-00000-theirs.parquet")]):
                (meta / "intents" / f"evil-{n:05d}.json").write_text(json.dumps({"key": f"evil-{n:05d}", "files": [target]}))
            (meta / "intents" / "odd-1.json").write_text(json.dumps({"key": 7, "files": "part-x.parquet"}))
            (meta / "intents" / "odd-2.json").write_text(json.dumps({"files": [str(tmp_path / "notes.txt")]}))
        with caplog.at_level(logging.WARNING, logger="vb_batch"):
            summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_skipped == 8 and summary.rows_processed == 0, fmt
        assert {k: v for k, v in digests(tmp_path).items() if k in before} == before, fmt
        assert_each_id_once(str(out), ids)
        assert "not vb_batch's" in caplog.text, fmt
