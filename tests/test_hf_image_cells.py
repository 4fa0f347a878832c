"""Hugging Face image cells (`struct<bytes, path>`): bytes are the image; a cell with only a path is read from it.

`datasets.Image()` columns built from files store `{bytes: null, path: ...}`. Such a
cell is read like a URI cell, under the same fetch rules: a URL or absolute path as written, a
relative path under the input's folder (a local `input.path`, or its parent when it is a file),
a path outside `input.allowed_prefixes` is the row's `uri_not_allowed` and is never read; a cell
with neither bytes nor path is `null_image`. Without an id column a path-only row's id is its
path as stored (a URI row's is its URI), a row with bytes keeps the SHA-256 of its bytes.

The table is built by `datasets` itself when it is installed (pyarrow with the same schema if not),
run through `vb_batch.annotate` on local files; the contract check runs it on every engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes
from hostile import SECRET_TEXT
from test_allowed_uris import CountingHandler, web_server  # noqa: F401 - web_server is a fixture
from test_engine_contract import comparable, stages_in_one_batch

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, InputConfig
from vb_batch.errors import RowError
from vb_batch.io.outputs import read_output
from vb_batch.io.sources import content_id, image_path_uri, input_folder

HF_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def painting(value: float) -> bytes:
    return png_bytes(depth.encode(np.full((16, 24), value, np.float32)))


def write_hf_parquet(path: Path, cells: list[dict | None], captions: list[str]) -> None:
    """A Parquet file as Hugging Face `datasets` writes an `Image()` column (pyarrow alone when it is missing)."""
    try:
        import datasets
    except ImportError:
        metadata = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}
        table = pa.table({"image": pa.array(cells, HF_IMAGE_TYPE), "caption": captions}).replace_schema_metadata(metadata)
    else:
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
        table = datasets.Dataset.from_dict({"image": cells, "caption": captions}, features=features).data.table
    assert table.schema.field("image").type == HF_IMAGE_TYPE
    pq.write_table(table, path)


@pytest.fixture
def hf_dataset(tmp_path, web_server):  # noqa: F811 - the fixture imported above
    """A dataset folder `ds/` (train.parquet, images/) and a photo outside it; {caption: expected vb_error code}."""
    folder, outside = tmp_path / "ds", tmp_path / "elsewhere"
    (folder / "images").mkdir(parents=True)
    outside.mkdir()
    (folder / "images" / "absolute.png").write_bytes(painting(2.0))
    (folder / "images" / "relative.png").write_bytes(painting(3.0))
    (folder / "images" / "notes.png").write_bytes(SECRET_TEXT)  # named like an image, holds text
    (outside / "private.png").write_bytes(painting(4.0))  # a valid image: only the allow rule keeps it out
    rows = {
        "embedded": ({"bytes": painting(1.0), "path": "embedded.png"}, None),
        "absolute path": ({"bytes": None, "path": str(folder / "images" / "absolute.png")}, None),
        "relative path": ({"bytes": None, "path": "images/relative.png"}, None),
        "outside path": ({"bytes": None, "path": str(outside / "private.png")}, "uri_not_allowed"),
        "relative escape": ({"bytes": None, "path": "../elsewhere/private.png"}, "uri_not_allowed"),
        "url path": ({"bytes": None, "path": f"{web_server}/a.png"}, "uri_not_allowed"),
        "text file": ({"bytes": None, "path": "images/notes.png"}, "not_image"),
        "missing file": ({"bytes": None, "path": "images/gone.png"}, "not_found"),
        "neither": (None, "null_image"),  # `datasets` writes a null cell; one only: null images share an id
    }
    write_hf_parquet(folder / "train.parquet", [cell for cell, _ in rows.values()], list(rows))
    return folder, {caption: code for caption, (_, code) in rows.items()}


def hf_job(folder: Path, out: Path, engine: str = "local") -> dict:
    return {
        "input": {"path": str(folder / "train.parquet"), "allowed_prefixes": [str(folder)]},
        "output": {"path": str(out), "mode": "overwrite", "rows_per_file": 4, "report": False},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 2},
        "engine": {"kind": engine, "cpu_batch_rows": 4},
        "run": {"progress": False, "max_error_fraction": 1.0},
    }


def test_path_only_cells_are_read_under_the_fetch_rules(hf_dataset, tmp_path):
    folder, expected = hf_dataset
    summary = vb_batch.annotate(hf_job(folder, tmp_path / "out"))
    out = read_output(str(tmp_path / "out"))
    by_caption = {row["caption"]: row for row in out.to_pylist()}
    assert set(by_caption) == set(expected)
    assert {caption: (row["vb_error"] or {}).get("code") for caption, row in by_caption.items()} == expected
    assert (summary.rows_ok, summary.rows_failed) == (3, 6)
    # The painted depth comes back from each source: the bytes, an absolute path, a relative path.
    sources = ["embedded", "absolute path", "relative path"]
    maps = vb_batch.load_arrays(str(tmp_path / "out"), "depth", ids=[by_caption[c]["id"] for c in sources])
    metres = {caption: float(np.median(values)) for caption, values in zip(sources, maps)}
    assert metres == pytest.approx({"embedded": 1.0, "absolute path": 2.0, "relative path": 3.0}, abs=0.01)
    # Refused before any read: the loopback server got no request; a message names the path, no content.
    assert CountingHandler.hits == []
    assert "outside input.allowed_prefixes" in by_caption["outside path"]["vb_error"]["message"]
    assert str(tmp_path / "elsewhere" / "private.png") in by_caption["relative escape"]["vb_error"]["message"]
    for row in out.to_pylist():
        message = (row["vb_error"] or {}).get("message", "")
        assert not any(part.decode() in message for part in (SECRET_TEXT[:8], b"[default", b"hostile-table-secret"))


def test_ids_without_an_id_column_are_the_path_or_the_content_hash(hf_dataset, tmp_path):
    folder, _ = hf_dataset
    vb_batch.annotate(hf_job(folder, tmp_path / "out"))
    ids = {row["caption"]: row["id"] for row in read_output(str(tmp_path / "out")).to_pylist()}
    assert ids["embedded"] == content_id(painting(1.0))
    assert ids["absolute path"] == str(folder / "images" / "absolute.png")
    assert ids["relative path"] == "images/relative.png"  # as stored: the same wherever the dataset is moved
    assert ids["neither"] == content_id(None)
    assert len(set(ids.values())) == len(ids)


def test_rows_naming_the_same_path_are_duplicate_ids(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.png").write_bytes(painting(1.0))
    cells = [{"bytes": None, "path": "a.png"}, {"bytes": None, "path": "a.png"}, {"bytes": None, "path": "b.png"}]
    write_hf_parquet(folder / "train.parquet", cells, ["first", "again", "other"])
    with pytest.raises(ConfigError, match="a.png"):
        vb_batch.annotate(hf_job(folder, tmp_path / "out"))


def test_relative_paths_resolve_against_a_local_input_folder_only(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"")
    assert input_folder(InputConfig(path=str(tmp_path / "train.parquet"))) == str(tmp_path)  # a file: its folder
    assert input_folder(InputConfig(path=str(tmp_path))) == str(tmp_path)  # a dataset or table folder
    assert input_folder(InputConfig(path="s3://bucket/ds/train.parquet")) is None
    assert input_folder(InputConfig(format="iceberg", table="ns.t", catalog={"uri": "sqlite:///c.db"})) is None
    assert image_path_uri("images/a.png", "/data/ds") == "/data/ds/images/a.png"
    for written in ("/abs/a.png", "s3://bucket/a.png", "https://host/a.png", "file:///abs/a.png", ""):
        assert image_path_uri(written, None) == written  # read (and checked) as written
    with pytest.raises(RowError) as err:
        image_path_uri("images/a.png", None)  # never read from the working directory
    assert err.value.code == "uri_invalid" and "images/a.png" in err.value.message


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
def test_every_engine_reads_path_only_cells_alike(engine, hf_dataset, tmp_path):
    folder, expected = hf_dataset
    cfg = hf_job(folder, tmp_path / "out", engine)
    summary = vb_batch.annotate(cfg)
    out = read_output(str(tmp_path / "out"))
    assert summary.engine == engine and (summary.rows_ok, summary.rows_failed) == (3, 6)
    assert comparable(out).equals(comparable(stages_in_one_batch(cfg)))
    codes = {row["caption"]: (row["vb_error"] or {}).get("code") for row in out.to_pylist()}
    assert codes == expected
