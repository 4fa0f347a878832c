"""Reading labels back anywhere: any table (DuckDB, Polars, Spark-written, Ray), ids and filters, describe, fractions."""

from __future__ import annotations

import re

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import PAINTED_LEGEND, write_painted_input
from hypothesis import given
from hypothesis import strategies as st

import vb_batch
from vb_batch.cli import main
from vb_batch.config import ConfigError, load_config
from vb_batch.io.outputs import read_output
from vb_batch.tasks import fraction_column_clashes, fraction_suffix

MAPS = ["depth", "normals", "segmentation"]


def job(tmp_path, out: str, **segmentation) -> dict:
    return {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / out), "rows_per_file": 5},
        "tasks": MAPS,
        "segmentation": {"classes": list(PAINTED_LEGEND.names), **segmentation},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A PNG-encoded output of 12 painted rows (depth, normals, segmentation; `bad-empty`, `bad-junk` fail)."""
    tmp_path = tmp_path_factory.mktemp("readback")
    ids = write_painted_input(tmp_path / "in.parquet")
    vb_batch.annotate(job(tmp_path, "out"))
    return tmp_path, str(tmp_path / "out"), ids


def by_id(out: str, column: str) -> dict:
    """Every row's decoded map, read from the output itself (the reference for every other reader)."""
    table = read_output(out, columns=["id", column])
    field = table.schema.field(column)
    return {i: vb_batch.decode_cell(cell, field) for i, cell in zip(table.column("id").to_pylist(), table.column(column))}


def assert_same(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, e)  # NaN == NaN, +inf == +inf, same dtype values


# ---------------------------------------------------------------------------- ids, filter, meta_from


def test_ids_come_back_in_the_order_given_and_filters_select_rows(output):
    _, out, _ = output
    reference = by_id(out, "depth")
    wanted = ["row-07", "row-00", "bad-junk", "row-04"]
    assert_same(vb_batch.load_arrays(out, "depth", ids=wanted), [reference[i] for i in wanted])
    assert vb_batch.load_arrays(out, "depth", ids=["bad-junk"]) == [None]
    # The filter speaks input.filter's syntax, over any column of the output.
    k_small = vb_batch.load_arrays(out, "depth", filter="k < 3")
    assert_same(k_small, [reference[f"row-0{k}"] for k in range(3)])
    both = vb_batch.load_arrays(out, "depth", filter="k >= 5", ids=["row-01", "row-06"])
    assert len(both) == 1 and np.array_equal(both[0], reference["row-06"], equal_nan=True)
    with pytest.raises(KeyError, match="row-99"):
        vb_batch.load_arrays(out, "depth", ids=["row-01", "row-99"])
    with pytest.raises(ConfigError, match="filter"):
        vb_batch.load_arrays(out, "depth", filter="no_such_column = 1")


@pytest.mark.parametrize("column", MAPS)
def test_duckdb_and_polars_subsets_decode_like_the_output(output, column):
    _, out, _ = output
    reference = by_id(out, column)
    files = f"{out}/part-*.parquet"
    selected = duckdb.sql(f"select id, {column} from '{files}' where depth_median_m < 12 or vb_error is not null")
    ids = [row[0] for row in duckdb.sql(f"select id from '{files}' where depth_median_m < 12 "
                                        "or vb_error is not null").fetchall()]
    assert 2 < len(ids) < 12  # a real subset, failed rows included
    got = vb_batch.load_arrays(selected, column, meta_from=out)
    assert_same(got, [reference[i] for i in ids])

    frame = pl.read_parquet(files).filter(pl.col("k") % 2 == 1).select("id", column)
    got = vb_batch.load_arrays(frame, column, meta_from=out, ids=frame["id"].to_list()[::-1])
    assert_same(got, [reference[i] for i in frame["id"].to_list()[::-1]])
    # pandas, from the same Arrow table
    frame = pq.read_table(out).to_pandas().head(4)
    assert_same(vb_batch.load_arrays(frame, column, meta_from=out), [reference[i] for i in frame["id"]])


def test_a_table_that_lost_its_meanings_is_a_clear_error(output):
    _, out, _ = output
    selected = duckdb.sql(f"select id, depth from '{out}/part-*.parquet'")
    with pytest.raises(ValueError, match=r"column 'depth'.*meta_from="):
        vb_batch.load_arrays(selected, "depth")
    with pytest.raises(ValueError, match=r"column 'depth_median_m'.*its maps: \['depth', 'normals', 'segmentation'\]"):
        vb_batch.load_arrays(pq.read_table(out), "depth_median_m", meta_from=out)
    with pytest.raises(KeyError, match="no_such_map"):
        vb_batch.load_arrays(out, "no_such_map")


def test_decode_cell_takes_any_form_of_the_meaning(output):
    _, out, _ = output
    table = pq.read_table(out)  # pyarrow keeps the field metadata
    reference = by_id(out, "normals")
    row = table.column("id").to_pylist().index("row-01")
    field = table.schema.field("normals")
    spark_style = {k.decode(): v.decode() for k, v in field.metadata.items()}  # Spark's df.schema[c].metadata
    for meaning in (field, field.metadata, spark_style):
        got = vb_batch.decode_cell(table.column("normals")[row], meaning)
        np.testing.assert_array_equal(got, reference["row-01"])
    assert vb_batch.decode_cell(None, field) is None
    with pytest.raises(ValueError, match="vb.kind"):
        vb_batch.decode_cell(b"x", {"vb.unit": "m"})


# ---------------------------------------------------------------------------- describe


def test_describe_prints_unit_scale_and_meaning_of_every_column(output, capsys):
    _, out, _ = output
    assert main(["describe", out]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert list(lines) == read_output(out).schema.names
    assert re.search(r"\bm\b.*value = \(stored - 0\) / 256; 0 = invalid, 65535 = far", lines["depth"])
    assert re.search(r"\bm\b.*median finite depth", lines["depth_median_m"])
    assert "unit vector" in lines["normals"] and "opengl" in lines["normals"]
    assert "legend road, car, sky" in lines["segmentation"] and "255 = unlabelled" in lines["segmentation"]
    assert "fraction (0..1)" in lines["segmentation_fractions"]
    assert "null when the row succeeded" in lines["vb_error"]
    assert text.startswith(f"{out}: parquet, 12 rows")
    # The same from Python, and for a query result given the output it came from.
    described = vb_batch.describe(duckdb.sql(f"select id, depth_max_m from '{out}/part-*.parquet'").arrow(),
                                  meta_from=out)
    assert [c.column for c in described.columns] == ["id", "depth_max_m"]
    assert described["depth_max_m"].unit == "m" and "largest" in described["depth_max_m"].meaning


# ---------------------------------------------------------------------------- class fractions


@pytest.mark.parametrize("fractions", ["columns", "map"])
def test_fractions_are_queried_without_lambdas(output, fractions):
    tmp_path, out, _ = output
    flat = str(tmp_path / f"out-{fractions}")
    cfg = job(tmp_path, f"out-{fractions}", fractions=fractions)
    cfg["tasks"] = ["segmentation"]
    vb_batch.annotate(cfg)
    masks = by_id(flat, "segmentation")
    expected = {i: float(np.mean(m == PAINTED_LEGEND.names.index("car"))) for i, m in masks.items() if m is not None}
    files = f"{flat}/part-*.parquet"
    if fractions == "columns":
        sql = f"select id, segmentation_frac_car from '{files}' where segmentation_frac_car is not null"
        polars = pl.read_parquet(files).filter(pl.col("segmentation_frac_road") >= 0).select(
            "id", pl.col("segmentation_frac_car"))
        names = read_output(flat).schema.names
        assert {n for n in names if "frac" in n} == {f"segmentation_frac_{c}" for c in PAINTED_LEGEND.names}
    else:
        sql = f"select id, segmentation_fractions['car'] from '{files}' where segmentation_fractions is not null"
        polars = pl.read_parquet(files).filter(pl.col("segmentation_fractions").is_not_null()).select(
            "id", pl.col("segmentation_fractions").map.get("car"))
    for got in (dict(duckdb.sql(sql).fetchall()), dict(polars.iter_rows())):
        assert got.keys() == expected.keys() and len(got) == 10
        assert all(abs(got[i] - expected[i]) < 1e-6 for i in got)
    # The list format (the default) says the same numbers.
    listed = dict(duckdb.sql(f"select id, segmentation_fractions from '{out}/part-*.parquet'").fetchall())
    assert all(abs({f["name"]: f["fraction"] for f in listed[i]}["car"] - expected[i]) < 1e-6 for i in expected)
    assert "fraction (0..1)" in str(vb_batch.describe(flat))


def test_fraction_columns_refuse_class_names_that_clash():
    cfg = {"input": {"path": "x"}, "model": {"backend": "identity"},
           "segmentation": {"classes": ["traffic light", "Traffic_Light"], "fractions": "columns"}}
    with pytest.raises(ConfigError, match="'traffic light' and 'Traffic_Light'"):
        load_config(cfg)
    cfg["segmentation"]["fractions"] = "map"
    assert load_config(cfg).segmentation.fractions == "map"


@given(st.lists(st.text(min_size=0, max_size=8), max_size=6))
def test_fraction_column_names_are_plain_sql_names_or_refused(names):
    clashes = fraction_column_clashes(names)
    if not clashes:
        suffixes = [fraction_suffix(n) for n in names]
        assert all(re.fullmatch(r"_frac_[a-z0-9]+(_[a-z0-9]+)*", s) for s in suffixes)
        assert len(set(suffixes)) == len(suffixes)


# ---------------------------------------------------------------------------- Ray and Spark


@pytest.mark.slow
def test_ray_annotator_takes_rays_default_batch_format(output, ray_local):
    import ray
    from ray.data import ActorPoolStrategy

    from vb_batch.ray import Annotator

    tmp_path, out, ids = output
    config = {"input": {"image_column": "image"}, "tasks": MAPS, "model": {"backend": "identity"},
              "segmentation": {"classes": list(PAINTED_LEGEND.names)}}
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
    labelled = ds.map_batches(Annotator, fn_constructor_kwargs={"config": config}, batch_size=4,
                              compute=ActorPoolStrategy(size=1))  # no batch_format: Ray's default (numpy)
    table = pa.concat_tables(labelled.iter_batches(batch_format="pyarrow", batch_size=None))
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    reference = by_id(out, "depth")
    assert_same(vb_batch.load_arrays(table, "depth", ids=ids), [reference[i] for i in ids])
    # pandas batches and numpy dicts, called as Ray calls an actor
    annotator = Annotator(config)
    frame = pq.read_table(tmp_path / "in.parquet").to_pandas().head(3)
    for batch in (frame, {name: frame[name].to_numpy() for name in frame.columns}):
        got = annotator(batch)
        assert isinstance(got, pa.Table) and got.column("id").to_pylist() == list(frame["id"])
        assert_same(vb_batch.load_arrays(got, "segmentation"), [by_id(out, "segmentation")[i] for i in frame["id"]])
    with pytest.raises(ConfigError, match="read_binary_files"):
        annotator({"id": np.array(["a"]), "image": np.zeros((1, 4, 4, 3), np.uint8)})


@pytest.mark.slow
def test_spark_written_labels_decode_like_the_output(output, spark):
    import vb_batch.spark

    tmp_path, out, ids = output
    df = spark.read.parquet(str(tmp_path / "in.parquet"))
    config = {"input": {"image_column": "image"}, "tasks": MAPS, "model": {"backend": "identity"},
              "segmentation": {"classes": list(PAINTED_LEGEND.names)}}
    labelled = vb_batch.spark.annotate(df, config, persist=True)
    assert labelled.is_cached
    written = str(tmp_path / "spark-labels")
    labelled.write.parquet(written)
    # A Spark DataFrame itself (collected), its meanings from its column metadata.
    few = labelled.where("k < 2").select("id", "depth")
    assert_same(vb_batch.load_arrays(few, "depth", ids=["row-01", "row-00"]),
                [by_id(out, "depth")[i] for i in ("row-01", "row-00")])
    labelled.unpersist()
    for column in MAPS:
        reference = by_id(out, column)
        # The folder Spark wrote (its column metadata in the files), and a table read from it.
        assert_same(vb_batch.load_arrays(written, column, ids=ids), [reference[i] for i in ids])
        table = pq.read_table(written)
        assert_same(vb_batch.load_arrays(table, column), [reference[i] for i in table.column("id").to_pylist()])
        subset = table.filter(pc.field("k") >= 6)  # a subset of what Spark wrote, selected by filter=
        assert_same(vb_batch.load_arrays(written, column, filter="k >= 6"),
                    [reference[i] for i in subset.column("id").to_pylist()])
    text = str(vb_batch.describe(written))
    assert re.search(r"depth_median_m +float +m ", text) and "legend road, car, sky" in text


def test_spark_workers_python_is_this_one_on_a_local_session_left_unset(tmp_path):
    from vb_batch.spark import worker_python

    python = str(tmp_path / "python3")
    assert worker_python("local[*]", "python3", configured=False, driver=python) == python
    assert worker_python("local-cluster[2,1,1024]", "python3", configured=False, driver=python) == python
    assert worker_python("local[*]", "/opt/py/bin/python", configured=True, driver=python) is None  # the user's word
    assert worker_python("spark://host:7077", "python3", configured=False, driver=python) is None  # checked instead
    assert worker_python("local[2]", python, configured=False, driver=python) is None


@pytest.mark.slow
def test_spark_workers_without_vb_batch_fail_on_the_driver_with_the_fix(spark, tmp_path):
    from vb_batch.spark import check_worker_python

    sc = spark.sparkContext
    before = sc.pythonExec
    sc.pythonExec = str(tmp_path / "no-such-python")
    try:
        with pytest.raises(ConfigError, match=r"cannot run vb_batch.*PYSPARK_PYTHON=.*spark\.pyspark\.python"):
            check_worker_python(spark)
    finally:
        sc.pythonExec = before
