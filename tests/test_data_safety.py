"""Data safety, tried as an attacker and an unlucky operator would (issue 17).

A job never harms anything but its own output, and never loses or repeats a row:

1. an output that is, contains or sits inside the input is refused (exit 2), input untouched;
2. a folder or table holding files vb_batch did not write is refused, or, when allowed, written
   next to and never touched; metadata naming files outside the output's own part files (a
   hand-edited or hostile `_vb/`) moves and deletes nothing;
3. null, NaN and duplicate ids are refused before any row is processed; ids in any column
   survive a kill -9 and a resume exactly once;
4. damaged metadata (empty or truncated records, leftover temporary files) and a full disk
   leave an output that the next run completes;
5. one writer per output: a second run fails fast while the first completes; leases race
   safely on S3; dead holders are taken over, live ones (other hosts, other containers) never;
   a run that lost its lease stops before its next commit and leaves the new holder alone;
6. resume / append with another job's columns or model is refused, listing what differs, also
   when the output lost its marker;
7. `run.retry_failed` re-runs failed rows once, replacing them;
8. kill -9 in the middle of a commit (locally, on S3, inside an overwrite or a retry), and a
   kill -9 loop at random points of writing and committing, then resume.

Everything is real: files, a moto S3 server on loopback, deltalake, pyiceberg on sqlite,
child processes killed with SIGKILL (`crashing_job.py`). Run with `-s` to see the kill
loop's counts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CountingIdentity, png_bytes
from deltalake import DeltaTable, write_deltalake
from s3_server import s3_server, use_fake_credentials

import vb_batch
from vb_batch.cli import main
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, OutputConfig, StorageOptions
from vb_batch.io import iceberg
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.lease import Lease, LeaseHeldError, LeaseLostError
from vb_batch.io.outputs import open_output, read_output
from vb_batch.models.base import register_backend

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- inputs, jobs, outputs


def painting(i: int, side: int = 16) -> bytes:
    """A PNG that paints a constant depth of 1 + i metres (row i's image)."""
    return png_bytes(depth.encode(np.full((side, side), 1.0 + i, np.float32)))


def images_table(ids: list, id_position: str = "first") -> pa.Table:
    """Rows of painted images, the id column first, in the middle or last."""
    columns = {"image": pa.array([painting(n) for n in range(len(ids))], pa.binary()),
               "note": [f"n{n}" for n in range(len(ids))]}
    names = {"first": ["id", "image", "note"], "middle": ["image", "id", "note"], "last": ["image", "note", "id"]}
    columns["id"] = ids
    return pa.table({name: columns[name] for name in names[id_position]})


def write_images(path, n: int, id_position: str = "first") -> list[str]:
    ids = [f"img-{i}" for i in range(n)]
    pq.write_table(images_table(ids, id_position), path)
    return ids


def job(input_path: str, output: dict, **sections) -> dict:
    """A small identity job (no report: it is not what these tests look at)."""
    return {
        "input": {"path": str(input_path)},
        "output": {"mode": "resume", "rows_per_file": 4, "commit_every": 8, "report": False, **output},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 4},
        "run": {"progress": False},
        **sections,
    }


def cli(cfg: dict, folder: Path, capsys) -> tuple[int, str]:
    """`vb-batch run` on `cfg` written as YAML: (exit code, its one line on stderr)."""
    path = folder / f"job-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return code, lines[-1] if lines else ""


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks followed), by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def output_ids(output: str | dict) -> list:
    """The ids committed in an output (any format); [] when nothing was ever committed."""
    target = OutputConfig(**output) if isinstance(output, dict) else output
    try:
        dataset = open_output(target).dataset
    except FileNotFoundError:  # a lake table before its first commit
        return []
    if not dataset.schema.names:
        # A Parquet output without a visible file (killed before its first commit landed) is a dataset
        # without columns, from which read_output(columns=[...]) cannot select: no rows.
        return []
    return dataset.to_table(columns=["id"]).column("id").to_pylist()


def assert_each_id_once(output: str | dict, expected: list) -> pa.Table:
    """The output holds every expected id exactly once, none failed, each with the depth its image painted
    (ids end in the row's number n, whose image paints 1 + n metres)."""
    table = read_output(OutputConfig(**output) if isinstance(output, dict) else output)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), collections.Counter(ids).most_common(3)
    assert sorted(ids) == sorted(expected)
    assert table.column("vb_error").null_count == table.num_rows
    for row_id, median in zip(ids, table.column("depth_median_m").to_pylist()):
        assert median == pytest.approx(1.0 + int(str(row_id).split("-")[-1]), rel=0.01), row_id
    return table


@pytest.fixture
def catalog(tmp_path):
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}


def lake_output(fmt: str, tmp_path: Path, catalog: dict, name: str = "labels") -> dict:
    """`output` of a job for each format: a Parquet folder, a Delta table, an Iceberg table."""
    if fmt == "iceberg":
        return {"format": "iceberg", "table": f"vb.{name}", "catalog": catalog}
    return {"format": fmt, "path": str(tmp_path / name)}


@pytest.fixture(scope="module")
def s3():
    """One moto S3 server on loopback for this module's S3 tests (each uses its own prefix)."""
    with pytest.MonkeyPatch.context() as mp:
        use_fake_credentials(mp)
        with s3_server() as server:
            yield server


def s3_objects(s3, prefix: str) -> dict[str, str]:
    return {key: hashlib.sha256(s3.get(key)).hexdigest() for key in s3.keys(prefix)}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------- 1. input/output overlap


@pytest.fixture
def data_folder(tmp_path):
    """tmp/data: a Parquet file, an unrelated file, a folder dataset, a folder of images, a Delta table;
    tmp/alias -> tmp/data (a symlink)."""
    data = tmp_path / "data"
    data.mkdir()
    write_images(data / "in.parquet", 6)
    (data / "notes.txt").write_text("someone else's notes: must survive\n")
    (data / "ds").mkdir()
    for part in range(2):
        pq.write_table(images_table([f"img-{part}-{i}" for i in range(3)]), data / "ds" / f"part-{part}.parquet")
    (data / "imgs").mkdir()
    for i in range(3):
        (data / "imgs" / f"{i}.png").write_bytes(painting(i))
    write_deltalake(str(data / "lake"), images_table([f"img-{i}" for i in range(4)]))
    (tmp_path / "alias").symlink_to(data, target_is_directory=True)
    return data


OVERLAPS = {
    # name: (input, output, output format), relative to tmp_path
    "output is the input's parent": ("data/in.parquet", "data", "parquet"),
    "output is the input file": ("data/in.parquet", "data/in.parquet", "parquet"),
    "output inside the input folder": ("data/ds", "data/ds/labels", "parquet"),
    "input inside the output (delta)": ("data/ds", "data", "delta"),
    "output inside an images folder": ("data/imgs", "data/imgs/labels", "parquet"),
    "output is the input delta table": ("data/lake", "data/lake", "delta"),
    "output inside the input delta table": ("data/lake", "data/lake/labels", "parquet"),
    "output through a symlink to the input's parent": ("data/in.parquet", "alias", "parquet"),
    "input through a symlink, output its real folder": ("alias/ds", "data/ds", "delta"),
    "output spelt with .. and a trailing slash": ("data/in.parquet", "data/ds/../", "parquet"),
    "output as a file:// URL": ("data/in.parquet", "file://{tmp}/data", "parquet"),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_an_output_overlapping_the_input_is_refused_and_nothing_is_touched(case, tmp_path, data_folder, capsys):
    inp, out, fmt = OVERLAPS[case]
    before = digests(data_folder)
    output = out.format(tmp=tmp_path) if "://" in out else str(tmp_path / out)
    code, line = cli(job(tmp_path / inp, {"path": output, "format": fmt, "mode": "overwrite"}), tmp_path, capsys)
    assert code == 2, line
    assert line.startswith("vb-batch: output.path:") and "input" in line
    assert digests(data_folder) == before
    assert (data_folder / "in.parquet").is_file() and not (data_folder / "labels").exists()


def test_an_output_next_to_the_input_is_not_an_overlap(tmp_path, data_folder, capsys):
    """The check is not a prefix match on strings: data-labels is not inside data."""
    before = digests(data_folder)
    code, line = cli(job(data_folder / "in.parquet", {"path": str(tmp_path / "data-labels"), "mode": "overwrite"}),
                     tmp_path, capsys)
    assert code == 0, line
    assert_each_id_once(str(tmp_path / "data-labels"), [f"img-{i}" for i in range(6)])
    assert digests(data_folder) == before


def test_an_output_inside_an_iceberg_input_table_is_refused(tmp_path, catalog, capsys):
    cat = iceberg.iceberg_catalog(catalog)
    cat.create_namespace("raw")
    table = cat.create_table("raw.images", schema=images_table(["img-0"]).schema)
    table.append(images_table([f"img-{i}" for i in range(3)]))
    location = Path(fsspec_filesystem(iceberg.iceberg_location(table))[1])
    before = digests(tmp_path / "warehouse")
    cfg = job("unused", {"path": str(location / "labels"), "mode": "overwrite"})
    cfg["input"] = {"format": "iceberg", "table": "raw.images", "catalog": catalog}
    code, line = cli(cfg, tmp_path, capsys)
    assert code == 2 and line.startswith("vb-batch: output.path:") and "sits inside" in line, line
    assert digests(tmp_path / "warehouse") == before


S3_OVERLAPS = [
    # (input key spelling, output spelling); {b} is the bucket
    ("s3://{b}/data/in.parquet", "s3://{b}/data"),
    ("s3://{b}/data/in.parquet", "s3a://{b}/data/"),
    ("s3://{b}/data/in.parquet", "s3://{b}/data//"),
    ("s3://{b}/data/in.parquet", "s3://{b}/data/in.parquet"),
    ("s3://{b}/data/in.parquet", "s3://{b}/data/in.parquet/labels"),
    ("s3://{b}/data/in.parquet", "s3://{b}/data/sub/../"),
    ("s3://{b}/data/in.parquet", "s3://{b}"),
    ("s3a://{b}/data/in.parquet", "s3://{b}/data/"),
    ("s3://{b}/data/", "s3://{b}/data/labels"),
]


def test_s3_outputs_overlapping_the_input_are_refused(s3, tmp_path, capsys):
    s3.put("data/in.parquet", parquet_bytes(images_table([f"img-{i}" for i in range(4)])))
    s3.put("data/notes.txt", b"someone else's notes")
    before = s3_objects(s3, "")
    for inp, out in S3_OVERLAPS:
        cfg = job(inp.format(b=s3.bucket), {"path": out.format(b=s3.bucket), "mode": "overwrite", "storage": s3.storage})
        cfg["input"]["storage"] = s3.storage
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2 and line.startswith("vb-batch: output.path:"), (inp, out, line)
        assert s3_objects(s3, "") == before, (inp, out)
    # A prefix that merely starts with the same letters is another place: the job runs.
    cfg = job(s3.url("data/in.parquet"), {"path": s3.url("data-labels"), "mode": "overwrite", "storage": s3.storage})
    cfg["input"]["storage"] = s3.storage
    assert cli(cfg, tmp_path, capsys)[0] == 0
    assert s3_objects(s3, "data/") == {k: v for k, v in before.items() if k.startswith("data/")}
    table = read_output(s3.url("data-labels"), columns=["id"], storage=StorageOptions(**s3.storage))
    assert sorted(table.column("id").to_pylist()) == [f"img-{i}" for i in range(4)]


# ---------------------------------------------------------------------------- 2. foreign files


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


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 3)
    (tmp_path / "notes.txt").write_text("precious")
    for fmt, mode in (("parquet", "overwrite"), ("parquet", "resume"), ("delta", "overwrite")):
        cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "notes.txt"), "format": fmt, "mode": mode})
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2 and "output.path" in line and "is a file" in line, (fmt, mode, line)
    assert (tmp_path / "notes.txt").read_text() == "precious"


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


# ---------------------------------------------------------------------------- 3. ids


BAD_IDS = {
    # problem: (ids, what the message must say)
    "null": (["a", None, "c", None, "e"], r"2 null id\(s\)"),
    "nan": ([0.5, float("nan"), 2.5, float("nan"), float("nan")], r"3 NaN id\(s\)"),
    "duplicate": (["a", "b", "b", "c", "b"], r"1 id\(s\) repeated \(2 extra rows\), e\.g\. 'b' x3"),
}


@pytest.mark.parametrize("input_format", ["parquet", "delta", "iceberg"])
@pytest.mark.parametrize("problem", list(BAD_IDS))
def test_bad_ids_are_refused_before_any_row_is_processed(problem, input_format, tmp_path, catalog):
    ids, message = BAD_IDS[problem]
    table = images_table(ids, "middle")
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})
    if input_format == "delta":
        write_deltalake(str(tmp_path / "images"), table)
        cfg["input"]["path"] = str(tmp_path / "images")
    elif input_format == "iceberg":
        cat = iceberg.iceberg_catalog(catalog)
        cat.create_namespace("raw")
        cat.create_table("raw.images", schema=table.schema).append(table)
        cfg["input"] = {"format": "iceberg", "table": "raw.images", "catalog": catalog}
    else:
        pq.write_table(table, tmp_path / "in.parquet")
    model = CountingIdentity()
    with pytest.raises(ConfigError, match=f"input.id_column: column 'id' must identify each row exactly once: {message}"):
        vb_batch.annotate(cfg, backend=model)
    assert model.images == 0
    assert not (tmp_path / "out").exists()  # no part file, no lease, no marker


def test_duplicate_uris_are_refused_when_ids_come_from_them(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(painting(i))
    uris = [str(tmp_path / "imgs" / f"{i}.png") for i in (0, 1, 1, 2)]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "in.parquet")
    model = CountingIdentity()
    with pytest.raises(ConfigError, match=r"input.uri_column: column 'uri' .* 1 id\(s\) repeated .*1\.png"):
        vb_batch.annotate(job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")}), backend=model)
    assert model.images == 0 and not (tmp_path / "out").exists()


def test_a_misspelt_id_or_image_column_is_a_config_error(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 3)
    cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "out")})
    code, line = cli({**cfg, "input": {**cfg["input"], "id_column": "ID"}}, tmp_path, capsys)
    assert code == 2 and line.startswith("vb-batch: input.id_column: column 'ID' not in the input"), line
    code, line = cli({**cfg, "input": {**cfg["input"], "image_column": "images"}}, tmp_path, capsys)
    assert code == 2 and line.startswith("vb-batch: input.image_column: column 'images' not in the input"), line
    assert not (tmp_path / "out").exists()


def child_env() -> dict[str, str]:
    """A child job's environment: this suite's modules (crashing_job, its backends) importable."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def run_child(job_path: Path, kill: tuple[str, str, int] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`crashing_job.py` on a job file; with `kill`, it SIGKILLs itself at (point, phase, n)."""
    argv = [sys.executable, str(TESTS / "crashing_job.py"), str(job_path), *([str(k) for k in kill] if kill else [])]
    return subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=timeout, check=False)


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


# ---------------------------------------------------------------------------- 4. damaged metadata, a full disk


def meta_dir(out: dict) -> Path:
    """An output's `_vb/` folder (an Iceberg table keeps it under its location)."""
    if out["format"] == "iceberg":
        table = iceberg.iceberg_catalog(out["catalog"]).load_table(out["table"])
        return Path(fsspec_filesystem(iceberg.iceberg_location(table))[1]) / "_vb"
    return Path(out["path"]) / "_vb"


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_damaged_metadata_is_dropped_with_a_warning_and_resume_completes(fmt, tmp_path, catalog, caplog):
    write_images(tmp_path / "in.parquet", 12)
    out = lake_output(fmt, tmp_path, catalog)
    assert vb_batch.annotate(job(tmp_path / "in.parquet", out)).success
    ids = write_images(tmp_path / "in.parquet", 20)  # 8 new rows for the resume to do
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
    else:
        intents = meta / "intents"
        intents.mkdir(exist_ok=True)
        (intents / "deadrun-00000.json").write_bytes(b"")
        (intents / "deadrun-00001.json").write_text('{"key": "deadrun-00001", "files": ["/nowh')
        (intents / "deadrun-00002.json.1a2b3c4d.tmp").write_text('{"key"')

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(job(tmp_path / "in.parquet", out))
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


# ---------------------------------------------------------------------------- 5. one writer per output


def wait_for(predicate, what: str, seconds: float = 60):
    """Poll `predicate` until it returns something true (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lease_holder(out: Path) -> dict | None:
    try:
        return json.loads((out / "_vb" / "lease.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def gated_job(tmp_path: Path, out: dict, n: int = 16) -> tuple[Path, Path, list[str]]:
    """A job file whose model waits for a gate file before its first batch: (job file, gate, ids)."""
    ids = write_images(tmp_path / "in.parquet", n)
    gate = tmp_path / "gate"
    cfg = job(tmp_path / "in.parquet", out)
    cfg["model"] = {"backend": "crashing_job:GatedBackend", "batch_size": 4, "options": {"gate": str(gate)}}
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, gate, ids


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_second_run_fails_fast_while_the_first_completes(fmt, tmp_path, capsys):
    out = {"format": fmt, "path": str(tmp_path / "labels"), "mode": "overwrite"}
    job_path, gate, ids = gated_job(tmp_path, out)
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for(lambda: lease_holder(tmp_path / "labels"), "the first run's lease")
        assert holder["pid"] == first.pid
        second = yaml.safe_load(job_path.read_text())  # the same job, fired twice
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match=f"being written by run {holder['run_id']}.*pid {first.pid}"):
            vb_batch.annotate(second)  # an overwrite: it would have removed the first run's rows
        code, line = cli({**second, "output": {**out, "mode": "resume"}}, tmp_path, capsys)
        assert code == 1 and holder["run_id"] in line, line
        assert time.monotonic() - started < 15  # fails fast: no waiting for the lease
        assert lease_holder(tmp_path / "labels")["token"] == holder["token"]  # the first run's lease is intact
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_each_id_once({"format": fmt, "path": out["path"]}, ids)
    assert not (tmp_path / "labels" / "_vb" / "lease.json").exists()
    if fmt == "parquet":
        assert (tmp_path / "labels" / "_SUCCESS").exists()
    else:
        assert DeltaTable(out["path"]).to_pyarrow_table().num_rows == len(ids)  # deltalake's own reader agrees


def test_a_killed_holder_is_taken_over_at_once(tmp_path, caplog):
    out = {"format": "parquet", "path": str(tmp_path / "labels")}
    job_path, gate, ids = gated_job(tmp_path, out)
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = wait_for(lambda: lease_holder(tmp_path / "labels"), "the first run's lease")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(str(job_path))  # the same job, resumed at once
    assert summary.success and time.monotonic() - started < 15  # not after lease_seconds (120 s)
    assert f"taking over the writer lease of run {holder['run_id']} (its process {first.pid} on this host has exited)" in caplog.text
    assert_each_id_once(out, ids)


def foreign_lease(out: Path, heartbeat_age: float, host: str = "other-host.example") -> dict:
    """A lease record of a run on another host whose last heartbeat is `heartbeat_age` seconds old."""
    record = {"token": uuid.uuid4().hex, "run_id": "20260101T000000Z-otherrun", "host": host, "pid": 4242,
              "boot_id": "another-boot", "process_start": "1", "acquired": time.time() - heartbeat_age - 5,
              "heartbeat": time.time() - heartbeat_age, "seconds": 120.0}
    (out / "_vb").mkdir(parents=True, exist_ok=True)
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    return record


def test_stale_leases_are_taken_over_and_live_ones_never(tmp_path, caplog):
    ids = write_images(tmp_path / "in.parquet", 8)
    out = tmp_path / "labels"
    cfg = job(tmp_path / "in.parquet", {"path": str(out)})
    live = foreign_lease(out, heartbeat_age=5)
    with pytest.raises(LeaseHeldError, match="run 20260101T000000Z-otherrun .host other-host.example, pid 4242"):
        vb_batch.annotate(cfg)
    assert lease_holder(out) == live and not list(out.glob("part-*"))

    foreign_lease(out, heartbeat_age=600)  # its host died ten minutes ago
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        assert vb_batch.annotate(cfg).success
    assert "taking over the writer lease of run 20260101T000000Z-otherrun (no heartbeat for 600 s" in caplog.text
    assert_each_id_once(str(out), ids)

    # On this host: a pid that is alive but is not the holder (its start time differs) is taken over too.
    from vb_batch.io.lease import _boot_id, _pid_namespace

    here = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()}
    record = {**foreign_lease(out, heartbeat_age=5), **here, "pid": os.getpid(), "process_start": "1"}
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    assert vb_batch.annotate(cfg).success
    # A run in another container of this host (same host name and boot, its own pids): the pid it names
    # does not exist here, but that says nothing about it; a fresh heartbeat keeps its lease.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {**foreign_lease(out, heartbeat_age=5), **here, "pid": dead.pid, "pid_ns": "pid:[1]"}
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    with pytest.raises(LeaseHeldError, match="otherrun"):
        vb_batch.annotate(cfg)
    record["pid_ns"] = _pid_namespace()  # the same pid, in this namespace: dead, taken over at once
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    assert vb_batch.annotate(cfg).success


def race_for_lease(make_lease, contenders: int = 4) -> list[int]:
    """`contenders` threads acquire a lease at the same moment: the indices of those that won."""
    barrier = threading.Barrier(contenders)
    won, errors = [], []

    def contend(n: int) -> None:
        lease = make_lease(n)
        barrier.wait()
        try:
            lease.acquire()
        except LeaseHeldError:
            return
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of the test
            errors.append(exc)
            return
        won.append((n, lease))

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for _, lease in won:
        lease.release()
    return [n for n, _ in won]


def test_leases_race_safely_on_s3_and_locally(s3, tmp_path):
    storage = StorageOptions(**s3.storage)
    url = s3.url("race/labels")
    fs, root = fsspec_filesystem(url, storage)
    for round_ in range(20):
        winners = race_for_lease(lambda n, r=round_: Lease(fs, f"{root}/_vb", url, f"run-{r}-{n}", 120))
        assert len(winners) == 1, (round_, winners)
        assert s3.keys("race/") == []  # released: the next round starts from a free lease
    local = tmp_path / "labels"
    lfs, lroot = fsspec_filesystem(str(local))
    for round_ in range(20):
        winners = race_for_lease(lambda n, r=round_: Lease(lfs, f"{lroot}/_vb", str(local), f"run-{r}-{n}", 120))
        assert len(winners) == 1, (round_, winners)


def test_s3_leases_of_other_hosts(s3, caplog):
    storage = StorageOptions(**s3.storage)
    url = s3.url("hosts/labels")
    fs, root = fsspec_filesystem(url, storage)
    record = {"token": "t0", "run_id": "run-elsewhere", "host": "other-host.example", "pid": 1, "seconds": 120.0}
    s3.put("hosts/labels/_vb/lease.json", json.dumps({**record, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseHeldError, match="run-elsewhere"):
        Lease(fs, f"{root}/_vb", url, "run-here", 120).acquire()
    s3.put("hosts/labels/_vb/lease.json", json.dumps({**record, "heartbeat": time.time() - 600}).encode())
    lease = Lease(fs, f"{root}/_vb", url, "run-here", 120)
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        lease.acquire()
    try:
        assert "taking over the writer lease of run run-elsewhere (no heartbeat" in caplog.text
        assert json.loads(s3.get("hosts/labels/_vb/lease.json"))["run_id"] == "run-here"
        lease.check()
    finally:
        lease.release()
    assert s3.keys("hosts/") == []

    # Taken over between two heartbeats: the next commit's check stops it, and its release leaves the new lease.
    lease = Lease(fs, f"{root}/_vb", url, "run-here", 120)
    lease.acquire()
    s3.put("hosts/labels/_vb/lease.json", json.dumps({**record, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseLostError, match="run run-elsewhere .host other-host.example. took the writer lease over"):
        lease.check()
    lease.release()
    assert json.loads(s3.get("hosts/labels/_vb/lease.json"))["run_id"] == "run-elsewhere"


def test_a_run_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(tmp_path):
    """Another host judged the first run dead (paused, cut off) and took the output over: the first run,
    back to life, stops before its next commit, even if no heartbeat noticed yet (lease_seconds 120)."""
    out = tmp_path / "labels"
    job_path, gate, _ = gated_job(tmp_path, {"format": "parquet", "path": str(out)})
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for(lambda: lease_holder(out), "the first run's lease")
        wait_for(lambda: (out / "_vb" / "output.json").exists(), "the first run's recovery (it writes the marker after)")
        taken = foreign_lease(out, heartbeat_age=0)  # the new holder, which also staged a file
        staged = out / "_vb" / "staging" / taken["run_id"] / f"part-{taken['run_id']}-00000.parquet"
        staged.parent.mkdir(parents=True)
        pq.write_table(images_table(["theirs-0"]), staged)
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=60)
    assert first.returncode == 1 and holder["run_id"] != taken["run_id"]
    assert "LeaseLostError" in stderr and "run 20260101T000000Z-otherrun (host other-host.example) took the writer lease" in stderr
    assert lease_holder(out) == taken  # the new holder's lease is not released by the old run
    assert staged.exists()  # nor its staged work deleted
    assert output_ids(str(out)) == [] and not list(out.glob("part-*"))  # the old run committed nothing


# ---------------------------------------------------------------------------- 6. resume compatibility


def compatible_job(input_path: Path, out: dict) -> dict:
    """The first job of an output: three tasks, so that each kind of change can be tried on it."""
    return job(input_path, out, tasks=["depth", "normals", "segmentation"],
               segmentation={"classes": ["road", "car", "sky"]})


CHANGES = {
    # what changes: (how the job changes, what the refusal must name)
    "encoding": (lambda cfg: cfg["output"].update(encoding="array"), "column 'depth': vb.encoding 'png' in the output, 'array'"),
    "tasks": (lambda cfg: cfg.update(tasks=["depth", "normals"]), "columns only in the output: ['segmentation'"),
    "legend": (lambda cfg: cfg.update(segmentation={"classes": ["road", "car", "tree"]}), "column 'segmentation': vb.legend"),
    "depth preset": (lambda cfg: cfg.update(depth={"preset": "steeper"}),
                     "column 'depth': vb.preset 'vision-banana' in the output, 'steeper'"),
    "frame": (lambda cfg: cfg.update(normals={"frame": "opencv"}), "column 'normals': vb.frame 'opengl' in the output, 'opencv'"),
    "model": (lambda cfg: cfg["model"].update(backend="identity-twin"), "model: 'identity' in the output, 'identity-twin'"),
}


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_resume_or_append_with_another_job_is_refused_listing_what_differs(fmt, tmp_path, catalog, capsys):
    # The same class as identity under another name: only the model's name differs.
    register_backend("identity-twin", "vb_batch.models.identity:IdentityBackend", replace=True)
    depth.register_preset(depth.DepthPreset(name="steeper", lam=-2.0), replace=True)
    ids = write_images(tmp_path / "in.parquet", 6)
    out = lake_output(fmt, tmp_path, catalog)
    first = compatible_job(tmp_path / "in.parquet", out)
    assert cli(first, tmp_path, capsys)[0] == 0
    before = digests(tmp_path / ("warehouse" if fmt == "iceberg" else "labels"))
    for n, (change, (apply, named)) in enumerate(CHANGES.items()):
        cfg = json.loads(json.dumps(first))
        apply(cfg)
        cfg["output"]["mode"] = ("resume", "append")[n % 2]
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2, (change, line)
        assert f"output.mode {cfg['output']['mode']}:" in line and "different job" in line and named in line, (change, line)
    assert digests(tmp_path / ("warehouse" if fmt == "iceberg" else "labels")) == before
    # The same job resumes (nothing to do) and overwrite replaces the output with the new columns.
    summary = vb_batch.annotate(first)
    assert summary.success and summary.rows_skipped == 6 and summary.rows_processed == 0
    cfg = json.loads(json.dumps(first))
    CHANGES["encoding"][0](cfg)
    cfg["output"]["mode"] = "overwrite"
    assert cli(cfg, tmp_path, capsys)[0] == 0
    table = read_output(OutputConfig(**out))
    assert sorted(table.column("id").to_pylist()) == ids
    assert table.schema.field("depth").metadata[b"vb.encoding"] == b"array"


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_an_output_that_lost_its_marker_still_refuses_another_job(fmt, tmp_path, catalog, capsys):
    """Outputs of earlier versions have no `_vb/output.json` (and a user may delete it): the rows say what they are."""
    write_images(tmp_path / "in.parquet", 6)
    out = lake_output(fmt, tmp_path, catalog)
    first = compatible_job(tmp_path / "in.parquet", out)
    assert cli(first, tmp_path, capsys)[0] == 0
    (meta_dir(out) / "output.json").unlink()
    for change in ("encoding", "legend", "model", "tasks"):
        register_backend("identity-twin", "vb_batch.models.identity:IdentityBackend", replace=True)
        cfg = json.loads(json.dumps(first))
        CHANGES[change][0](cfg)
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2 and CHANGES[change][1] in line, (change, line)
    ids = write_images(tmp_path / "in.parquet", 9)
    summary = vb_batch.annotate(first)  # the same job is still welcome
    assert summary.success and summary.rows_skipped == 6 and summary.rows_processed == 3
    assert sorted(output_ids(out)) == ids


# ---------------------------------------------------------------------------- 7. failed rows re-run once


@pytest.mark.parametrize("fmt", ["parquet", "delta", "iceberg"])
def test_retry_failed_re_runs_failed_rows_once(fmt, tmp_path, catalog):
    images = tmp_path / "imgs"
    images.mkdir()
    missing = {3, 6, 7}
    for i in range(10):
        if i not in missing:
            (images / f"img-{i}.png").write_bytes(painting(i))
    ids = [f"img-{i}" for i in range(10)]
    pq.write_table(pa.table({"id": ids, "uri": [str(images / f"{i}.png") for i in ids]}), tmp_path / "in.parquet")
    out = lake_output(fmt, tmp_path, catalog)
    cfg = job(tmp_path / "in.parquet", out, run={"progress": False, "max_error_fraction": 1.0})
    first = vb_batch.annotate(cfg)
    assert first.rows_failed == 3 and first.errors_by_code == {"not_found": 3}
    failed = read_output(OutputConfig(**out), columns=["id", "vb_error"]).to_pylist()
    assert sorted(r["id"] for r in failed if r["vb_error"]) == ["img-3", "img-6", "img-7"]

    for i in missing:  # the operator fixes what was missing
        (images / f"img-{i}.png").write_bytes(painting(i))
    again = vb_batch.annotate(cfg)  # a plain resume: failed rows count as done
    assert again.rows_processed == 0 and again.rows_skipped == 10
    retry = {**cfg, "run": {**cfg["run"], "retry_failed": True}}
    summary = vb_batch.annotate(retry)
    assert summary.success and summary.rows_processed == 3 and summary.rows_ok == 3 and summary.rows_skipped == 7
    assert_each_id_once(out, ids)
    summary = vb_batch.annotate(retry)  # nothing failed any more: nothing to re-run
    assert summary.rows_processed == 0 and summary.rows_skipped == 10
    assert_each_id_once(out, ids)


# ---------------------------------------------------------------------------- 8. kill -9 mid-commit, and the kill -9 loop


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


# ---------------------------------------------------------------------------- known gaps (outside the sinks)


def test_an_iceberg_output_inside_the_input_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for part in range(2):
        pq.write_table(images_table([f"img-{part}-{i}" for i in range(3)]), data / f"part-{part}.parquet")
    before = digests(data)
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{data}/warehouse"}
    code, line = cli(job(data, {"format": "iceberg", "table": "vb.labels", "catalog": catalog, "mode": "overwrite"}),
                     tmp_path, capsys)
    assert digests(data) == before  # today: the table's data and metadata files land in the input dataset
    assert code == 2 and "input" in line


def test_resume_with_another_custom_depth_preset_is_refused(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 4)
    first = job(tmp_path / "in.parquet", {"path": str(tmp_path / "labels")}, depth={"preset": {"lam": -3.0, "c": 3.0}})
    assert cli(first, tmp_path, capsys)[0] == 0
    other = {**first, "depth": {"preset": {"lam": -3.0, "c": 30.0}}}  # metres ten times as far for one colour
    code, line = cli(other, tmp_path, capsys)
    assert code == 2 and "vb.preset" in line, line
