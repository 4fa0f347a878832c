"""An output never overlaps its input: one that is, contains or sits inside the input is refused.

Whatever the spelling (a symlink, `..`, a trailing slash, a file:// URL, s3 / s3a, a doubled slash),
whatever the formats (a Parquet file or folder, a folder of images, a Delta table, an Iceberg table
whose location is the output's parent), the run exits 2 naming `output.path`, and every input file is
byte for byte what it was. An output next to the input (`data-labels` beside `data`) is no overlap.
An output path that is a file is refused too.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from output_safety import (
    assert_each_id_once,
    cli,
    digests,
    images_table,
    job,
    painting,
    parquet_bytes,
    s3_objects,
    write_images,
)

from vb_batch.config import StorageOptions
from vb_batch.io import iceberg
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.outputs import read_output


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


@pytest.mark.slow  # ~2 s: ten jobs on S3
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


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    write_images(tmp_path / "in.parquet", 3)
    (tmp_path / "notes.txt").write_text("precious")
    for fmt, mode in (("parquet", "overwrite"), ("parquet", "resume"), ("delta", "overwrite")):
        cfg = job(tmp_path / "in.parquet", {"path": str(tmp_path / "notes.txt"), "format": fmt, "mode": mode})
        code, line = cli(cfg, tmp_path, capsys)
        assert code == 2 and "output.path" in line and "is a file" in line, (fmt, mode, line)
    assert (tmp_path / "notes.txt").read_text() == "precious"


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
