"""Row ids identify each row exactly once, or the job is refused before any row is processed.

Null, NaN and repeated ids (in Parquet, Delta and Iceberg inputs, the id column anywhere) and repeated
URIs when ids come from them are refused with the count and an example; a misspelt id or image column
is a config error naming the field. Ids in any column surviving a kill -9 are in test_crash_recovery.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CountingIdentity
from deltalake import write_deltalake
from output_safety import (
    cli,
    images_table,
    job,
    painting,
    write_images,
)

import vb_batch
from vb_batch.config import ConfigError
from vb_batch.io import iceberg

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
