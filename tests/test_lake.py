"""Lake tables in and out: Delta and Iceberg sinks and sources, incremental runs, filters, readers, other engines' readers."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from conftest import CountingIdentity, png_bytes

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, OutputConfig, load_config
from vb_batch.io import iceberg
from vb_batch.io.outputs import open_output, read_output
from vb_batch.io.sources import open_source, read_unit



def images_table(ids: list[str], days: list[str]) -> pa.Table:
    """Rows whose images paint a constant depth: row `img-<i>` is at 1 + i metres."""
    cells = [png_bytes(depth.encode(np.full((16, 24), 1.0 + int(i.split("-")[1]), np.float32))) for i in ids]
    return pa.table({"id": ids, "day": days, "image": pa.array(cells, pa.binary())})


def first_rows(n: int, start: int = 0, days=("2026-11-01", "2026-11-02")) -> pa.Table:
    ids = [f"img-{i}" for i in range(start, start + n)]
    return images_table(ids, [days[i % len(days)] for i in range(start, start + n)])


def job(inp: dict, out: dict) -> dict:
    return {
        "input": inp,
        "output": {"mode": "resume", "rows_per_file": 3, **out},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 4},
        "run": {"progress": False},
    }


def assert_depths(output, ids_expected: list[str]) -> None:
    """The output holds each expected id once, and its depth decodes to the metres its image painted."""
    table = read_output(output, columns=["id", "depth"])
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(ids_expected)
    for row_id, values in zip(ids, vb_batch.load_arrays(table, "depth")):
        assert values.shape == (16, 24)
        assert np.allclose(values, 1.0 + int(row_id.split("-")[1]), atol=0.01)


# ---------------------------------------------------------------------------- outputs


def test_delta_output_modes_and_metadata(tmp_path):
    """Delta's own reader sees one version per run with vb_batch's field metadata; the job-level metadata
    comes back from the commit info. (The modes themselves, on every format: test_sink_contract.py.)"""
    pq.write_table(first_rows(5), tmp_path / "in.parquet")
    out = str(tmp_path / "labels")
    cfg = job({"path": str(tmp_path / "in.parquet")}, {"format": "delta", "path": out, "mode": "error"})
    assert vb_batch.annotate(cfg).success
    table = DeltaTable(out)  # deltalake's own reader
    assert table.version() == 0 and table.to_pyarrow_table().num_rows == 5
    field = next(f for f in table.schema().fields if f.name == "depth")
    assert field.metadata["vb.kind"] == "depth" and field.metadata["vb.unit"] == "m"
    assert_depths(out, [f"img-{i}" for i in range(5)])
    # The job-level metadata comes back from the commit info, so readers find the image column.
    schema = open_output(out).dataset.schema
    assert schema.metadata[b"vb.image_column"] == b"image" and json.loads(schema.metadata[b"vb.job"])["tasks"] == ["depth"]
    vb_batch.annotate({**cfg, "output": {**cfg["output"], "mode": "overwrite"}})
    assert DeltaTable(out).version() == 1 and DeltaTable(out).to_pyarrow_table().num_rows == 5
    assert os.path.exists(f"{out}/_report.html")


def test_iceberg_output_modes_and_metadata(tmp_path, catalog):
    """pyiceberg's own reader sees one snapshot per commit, vb_batch's field metadata as table properties;
    the table's location alone is enough to read it. (The modes, on every format: test_sink_contract.py.)"""
    pq.write_table(first_rows(5), tmp_path / "in.parquet")
    out = {"format": "iceberg", "table": "labels.depth", "catalog": catalog, "mode": "error"}
    cfg = job({"path": str(tmp_path / "in.parquet")}, out)
    assert vb_batch.annotate(cfg).success
    table = iceberg.iceberg_catalog(catalog).load_table("labels.depth")  # pyiceberg's own reader
    assert len(table.snapshots()) == 1 and table.scan().to_arrow().num_rows == 5
    assert json.loads(table.properties["vb.column.depth"])["vb.unit"] == "m"
    output = OutputConfig(**out)
    assert_depths(output, [f"img-{i}" for i in range(5)])
    schema = open_output(output).dataset.schema
    assert schema.field("depth").metadata[b"vb.kind"] == b"depth"
    assert schema.metadata[b"vb.image_column"] == b"image"
    # Its location alone is enough to read it (the newest metadata file), as for the run report.
    assert len(vb_batch.load_arrays(table.location(), "depth")) == 5
    vb_batch.annotate({**cfg, "output": {**out, "mode": "overwrite"}})
    table = iceberg.iceberg_catalog(catalog).load_table("labels.depth")
    assert table.scan().to_arrow().num_rows == 5  # the old rows deleted, the new ones added, in one transaction


def test_config_names_the_lake_fields():
    with pytest.raises(ConfigError, match="output.table"):
        load_config({"input": {"path": "x"}, "output": {"format": "iceberg"}})
    with pytest.raises(ConfigError, match="input.table"):
        load_config({"input": {"format": "iceberg"}})
    with pytest.raises(ConfigError, match="output.partition_by"):
        load_config({"input": {"path": "x"}, "output": {"partition_by": ["day"]}})
    with pytest.raises(ConfigError, match="input.filter"):
        load_config({"input": {"path": "x", "filter": "day = "}})
    with pytest.raises(ConfigError, match="output.catalog.uri"):
        load_config({"input": {"path": "x"},
                     "output": {"format": "iceberg", "table": "a.b", "catalog": {"uri": "postgresql://u:pw@db/cat"}}})
    with pytest.raises(ConfigError, match="output.path"):
        load_config({"input": {"path": "x"}, "output": {"format": "iceberg", "table": "a.b", "path": "out"}})
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    assert load_config(os.path.join(conf, "delta.yaml")).output.partition_by == ["day"]
    assert load_config(os.path.join(conf, "iceberg.yaml")).input.filter.startswith("camera in")


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_partitioned_output(tmp_path, catalog, fmt):
    pq.write_table(first_rows(6), tmp_path / "in.parquet")
    out = ({"format": "delta", "path": str(tmp_path / "labels")} if fmt == "delta"
           else {"format": "iceberg", "table": "labels.by_day", "catalog": catalog})
    vb_batch.annotate(job({"path": str(tmp_path / "in.parquet")}, {**out, "partition_by": ["day"]}))
    if fmt == "delta":
        table = DeltaTable(out["path"])
        assert table.metadata().partition_columns == ["day"]
        assert sorted(table.partitions(), key=str) == [{"day": "2026-11-01"}, {"day": "2026-11-02"}]
        assert table.to_pyarrow_table(filters=[("day", "=", "2026-11-02")]).num_rows == 3
    else:
        table = iceberg.iceberg_catalog(catalog).load_table("labels.by_day")
        assert [f.name for f in table.spec().fields] == ["day"]
        assert table.scan(row_filter="day = '2026-11-02'").to_arrow().num_rows == 3
    output = OutputConfig(**out, partition_by=["day"])
    assert_depths(output, [f"img-{i}" for i in range(6)])
    assert open_output(output).dataset.schema.field("depth").metadata[b"vb.scale"] == b"256.0"


@pytest.mark.slow  # ~3.5 s: Delta and Iceberg through S3
def test_lake_tables_in_and_out_of_s3(s3, tmp_path):
    from s3_server import SECRET

    from vb_batch.config import StorageOptions
    from vb_batch.io.filesystems import delta_storage_options

    options = delta_storage_options(s3.url(), StorageOptions(**s3.storage))
    write_deltalake(s3.url("raw/images"), first_rows(6), partition_by=["day"], storage_options=options)
    source = {"path": s3.url("raw/images"), "storage": s3.storage, "filter": "day = '2026-11-01'"}

    delta_out = {"format": "delta", "path": s3.url("lake/labels"), "storage": s3.storage}
    vb_batch.annotate(job(source, delta_out))
    table = DeltaTable(s3.url("lake/labels"), storage_options=options)  # deltalake's own reader
    assert table.version() == 0 and table.to_pyarrow_table().num_rows == 3
    assert next(f for f in table.schema().fields if f.name == "depth").metadata["vb.kind"] == "depth"
    assert_depths(OutputConfig(**delta_out), ["img-0", "img-2", "img-4"])

    # A scheduled run after new rows arrived: one new version with exactly the new rows.
    write_deltalake(s3.url("raw/images"), first_rows(2, start=6), partition_by=["day"], mode="append", storage_options=options)
    model = CountingIdentity()
    vb_batch.annotate(job(source, delta_out), backend=model)
    assert model.images == 1 and DeltaTable(s3.url("lake/labels"), storage_options=options).version() == 1

    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": s3.url("warehouse")}
    iceberg_out = {"format": "iceberg", "table": "labels.images", "catalog": catalog, "storage": s3.storage}
    vb_batch.annotate(job(source, iceberg_out))
    table = iceberg.iceberg_catalog(catalog, StorageOptions(**s3.storage)).load_table("labels.images")
    assert table.location().startswith(s3.url("warehouse"))
    assert sorted(table.scan().to_arrow().column("id").to_pylist()) == ["img-0", "img-2", "img-4", "img-6"]
    assert_depths(OutputConfig(**iceberg_out), ["img-0", "img-2", "img-4", "img-6"])

    keys = s3.keys()
    assert any(k.startswith("warehouse/labels/images/data/part-") for k in keys)
    assert not any("/_vb/staging/" in k or "/_vb/intents/" in k for k in keys)  # nothing left half-done
    for key in keys:
        assert SECRET.encode() not in s3.get(key), key


# ---------------------------------------------------------------------------- inputs, incremental runs


def test_incremental_delta_job_processes_only_new_rows(tmp_path):
    source = str(tmp_path / "images")
    write_deltalake(source, first_rows(6), partition_by=["day"])
    out = str(tmp_path / "labels")
    cfg = job({"path": source}, {"format": "delta", "path": out, "commit_every": 0})

    model = CountingIdentity()
    vb_batch.annotate(cfg, backend=model)
    assert model.images == 6 and DeltaTable(out).version() == 0

    write_deltalake(source, first_rows(4, start=6), partition_by=["day"], mode="append")
    model = CountingIdentity()
    summary = vb_batch.annotate(cfg, backend=model)
    assert model.images == 4 and summary.rows_skipped == 6
    assert DeltaTable(out).version() == 1  # exactly one new table version
    assert_depths(out, [f"img-{i}" for i in range(10)])


def test_incremental_iceberg_job_processes_only_new_rows(tmp_path, catalog):
    source = iceberg.iceberg_catalog(catalog)
    source.create_namespace("raw")
    images = source.create_table("raw.images", schema=first_rows(1).schema)
    images.append(first_rows(6))
    out = {"format": "iceberg", "table": "labels.images", "catalog": catalog, "commit_every": 0}
    cfg = job({"format": "iceberg", "table": "raw.images", "catalog": catalog}, out)

    model = CountingIdentity()
    vb_batch.annotate(cfg, backend=model)
    assert model.images == 6

    images.append(first_rows(4, start=6))
    before = len(iceberg.iceberg_catalog(catalog).load_table("labels.images").snapshots())
    model = CountingIdentity()
    summary = vb_batch.annotate(cfg, backend=model)
    assert model.images == 4 and summary.rows_skipped == 6
    assert len(iceberg.iceberg_catalog(catalog).load_table("labels.images").snapshots()) == before + 1
    assert_depths(OutputConfig(**out), [f"img-{i}" for i in range(10)])


def test_filter_points_a_scheduled_job_at_one_partition(tmp_path, catalog):
    source = str(tmp_path / "images")
    write_deltalake(source, first_rows(8), partition_by=["day"])
    out = str(tmp_path / "labels")
    model = CountingIdentity()
    vb_batch.annotate(job({"path": source, "filter": "day = '2026-11-02'"}, {"format": "delta", "path": out}), backend=model)
    assert model.images == 4
    assert_depths(out, ["img-1", "img-3", "img-5", "img-7"])

    # The same syntax filters rows of Parquet and Iceberg inputs.
    pq.write_table(first_rows(8), tmp_path / "in.parquet")
    parquet_source = open_source(load_config({"model": {"backend": "identity"}, "input": {"path": str(tmp_path / "in.parquet"),
                                                        "filter": "day = '2026-11-01' and id != 'img-0'"}}).input)
    assert parquet_source.count_rows() == 3
    catalog_ = iceberg.iceberg_catalog(catalog)
    catalog_.create_namespace("raw")
    catalog_.create_table("raw.images", schema=first_rows(1).schema).append(first_rows(8))
    iceberg_source = open_source(load_config({"model": {"backend": "identity"}, "input": {"format": "iceberg", "table": "raw.images", "catalog": catalog,
                                                        "filter": "id in ('img-1', 'img-2')"}}).input)
    assert sorted(b["id"] for batch in iceberg_source.batches(10) for b in batch.to_pylist()) == ["img-1", "img-2"]
    with pytest.raises(ConfigError, match="input.filter"):
        open_source(load_config({"model": {"backend": "identity"}, "input": {"path": source, "filter": "camera = 'a'"}}).input)


def test_units_of_a_partitioned_delta_table_carry_partition_values(tmp_path):
    """What distributed engines read: one unit per row group, partitions pruned by the filter, values put back."""
    source = str(tmp_path / "images")
    write_deltalake(source, first_rows(8), partition_by=["day"])
    cfg = load_config({"model": {"backend": "identity"}, "input": {"path": source, "filter": "day = '2026-11-01' and id != 'img-2'"}}).input
    opened = open_source(cfg)
    units = json.loads(json.dumps(opened.units()))  # JSON-ready, as Spark ships them
    assert len(units) == 1 and units[0]["partition"] == {"day": "2026-11-01"}
    rows = [r for unit in units for b in read_unit(unit, cfg, opened.dataset.schema, 2) for r in b.to_pylist()]
    assert sorted(r["id"] for r in rows) == ["img-0", "img-4", "img-6"]
    assert {r["day"] for r in rows} == {"2026-11-01"}


# ---------------------------------------------------------------------------- readers


def test_label_dataset_and_report_on_a_delta_output(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from vb_batch.readers import LabelDataset
    from vb_batch.io.outputs import OutputView
    from vb_batch.report import build_report

    pq.write_table(first_rows(6), tmp_path / "in.parquet")
    out = str(tmp_path / "labels")
    vb_batch.annotate(job({"path": str(tmp_path / "in.parquet")}, {"format": "delta", "path": out, "partition_by": ["day"]}))
    view = OutputView(out)
    assert list(view.maps) == ["depth"] and view.image_column == "image"
    assert "6 rows" in build_report(out)

    dataset = LabelDataset(out, maps=["depth"])
    assert len(dataset) == 6
    seen = {item["id"]: item for item in DataLoader(dataset, batch_size=None, num_workers=2)}
    assert sorted(seen) == [f"img-{i}" for i in range(6)]
    for row_id, item in seen.items():
        assert item["depth"].dtype == torch.float32 and item["image"].shape == (3, 16, 24)
        assert torch.allclose(item["depth"], torch.full((16, 24), 1.0 + int(row_id.split("-")[1])), atol=0.01)


def test_duckdb_and_polars_read_the_parquet_output(tmp_path):
    import duckdb
    import polars
    pq.write_table(first_rows(5), tmp_path / "in.parquet")
    out = tmp_path / "labels"
    vb_batch.annotate(job({"path": str(tmp_path / "in.parquet")}, {"path": str(out)}))
    files = str(out / "*.parquet")
    query = f"select count(*), median(depth_median_m) from read_parquet('{files}')"
    count, median = duckdb.connect().execute(query).fetchone()
    assert count == 5 and median == pytest.approx(3.0, abs=0.01)
    frame = polars.read_parquet(files)
    assert frame.height == 5 and frame["vb_error"].null_count() == 5
    assert sorted(frame["id"].to_list()) == [f"img-{i}" for i in range(5)]


@pytest.mark.slow
def test_spark_reads_the_parquet_output_and_runs_on_a_delta_table(tmp_path, monkeypatch):
    """One short Spark session (local[1]): `spark.read.parquet` on an output, and the Spark engine on a lake table."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    own = session is None
    if own:
        monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # local mode's Python workers (spark.pyspark.python is not read)
        session = (SparkSession.builder.master("local[1]").appName("vb-batch lake test")
                   .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.enabled", "false").getOrCreate())
    try:
        pq.write_table(first_rows(5), tmp_path / "in.parquet")
        out = str(tmp_path / "labels")
        vb_batch.annotate(job({"path": str(tmp_path / "in.parquet")}, {"path": out}))
        frame = session.read.parquet(out)
        assert frame.count() == 5 and set(frame.columns) >= {"id", "depth", "depth_median_m", "vb_error"}

        source = str(tmp_path / "images")
        write_deltalake(source, first_rows(6), partition_by=["day"])
        delta_out = str(tmp_path / "delta-labels")
        cfg = job({"path": source, "filter": "day = '2026-11-02'"}, {"format": "delta", "path": delta_out})
        summary = vb_batch.annotate({**cfg, "engine": {"kind": "spark"}})
        assert summary.success and summary.rows_processed == 3
        assert DeltaTable(delta_out).version() == 0
        assert_depths(delta_out, ["img-1", "img-3", "img-5"])

        catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}
        iceberg_out = {"format": "iceberg", "table": "labels.images", "catalog": catalog}
        summary = vb_batch.annotate({**job(cfg["input"], iceberg_out), "engine": {"kind": "spark"}})
        assert summary.rows_processed == 3
        assert_depths(OutputConfig(**iceberg_out), ["img-1", "img-3", "img-5"])
    finally:
        if own:
            session.stop()
