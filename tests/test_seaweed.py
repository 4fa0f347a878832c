"""Parquet, Delta and Iceberg on a real S3 store and Iceberg REST catalog: SeaweedFS (issue 30).

What a real server adds over moto: keys and signatures are checked, a failed conditional
write answers 412, and a table bucket (as AWS S3 Tables) keeps its tables' locations to
itself. On it, for every output format (a Parquet folder and a Delta table on S3, an
Iceberg table through the REST catalog over the table bucket, SigV4 signing name
`s3tables`):

- every output mode holds: resume processes only new rows, append adds, overwrite
  replaces, `run.retry_failed` re-runs failed rows once; every id ends in the output once;
- one writer: while a run holds the output, a second is refused and names the holder;
- Iceberg input comes through the REST catalog, a resume reads only new rows;
- every engine (local, Ray, Spark) writes to S3 what the stages give in one batch.

The session's one SeaweedFS is conftest's `seaweed`; each test gets a fresh bucket (`s3`)
and, for Iceberg, its own namespace in the table bucket. An Iceberg table there holds nothing but
what the catalog and its data files put there: the lease, fingerprint and run records are table
properties (`vb_batch.io.sinks.iceberg`).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pytest
import yaml
from output_safety import TESTS, assert_each_id_once, child_env, job, painting, parquet_bytes

import vb_batch
from vb_batch.config import StorageOptions
from vb_batch.io.filesystems import delta_storage_options
from vb_batch.io.tables.iceberg import iceberg_catalog, iceberg_table
from vb_batch.io.lease import LeaseHeldError
from vb_batch.io.outputs import read_output

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

FORMATS = ["parquet", "delta", "iceberg"]


def images(ids: list[str]) -> pa.Table:
    """Rows whose image paints 1 + n metres for id `img-n` (what `assert_each_id_once` checks)."""
    return pa.table({"id": ids, "image": pa.array([painting(int(i.split("-")[-1])) for i in ids], pa.binary())})


def ids_of(numbers) -> list[str]:
    return [f"img-{n}" for n in numbers]


def output_on(fmt: str, s3, seaweed, name: str = "labels") -> dict:
    """`output` for `fmt` on SeaweedFS: a folder in the test's bucket, or a table in the REST catalog."""
    if fmt == "iceberg":
        namespace = f"t{uuid.uuid4().hex[:10]}"  # the table bucket is the session's: one namespace per test
        return {"format": "iceberg", "table": f"{namespace}.{name}", "catalog": seaweed.catalog(), "storage": s3.storage}
    return {"format": fmt, "path": s3.url(name), "storage": s3.storage}


def s3_job(s3, input_url: str, out: dict, **sections) -> dict:
    cfg = job(input_url, out, **sections)
    cfg["input"]["storage"] = s3.storage
    return cfg


def lake_readers_agree(fmt: str, out: dict, ids: list[str]) -> None:
    """The format's own reader (deltalake, pyiceberg) sees exactly `ids`."""
    if fmt == "delta":
        from deltalake import DeltaTable

        options = delta_storage_options(out["path"], StorageOptions(**out["storage"]))
        seen = DeltaTable(out["path"], storage_options=options).to_pyarrow_table(columns=["id"])
    elif fmt == "iceberg":
        table = iceberg_catalog(out["catalog"], StorageOptions(**out["storage"])).load_table(out["table"])
        seen = table.scan(selected_fields=("id",)).to_arrow()
    else:
        return
    assert sorted(seen.column("id").to_pylist()) == sorted(ids)


@pytest.mark.slow  # ~1.5-2 s each
@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_append_and_overwrite_hold_on_s3(fmt, s3, seaweed):
    out = output_on(fmt, s3, seaweed)
    s3.put("in/part-0.parquet", parquet_bytes(images(ids_of(range(6)))))
    first = vb_batch.annotate(s3_job(s3, s3.url("in/"), out))
    assert first.success and first.rows_ok == 6

    s3.put("in/part-1.parquet", parquet_bytes(images(ids_of(range(6, 10)))))  # new rows arrive
    resumed = vb_batch.annotate(s3_job(s3, s3.url("in/"), out))
    assert (resumed.rows_skipped, resumed.rows_processed) == (6, 4)
    assert_each_id_once(out, ids_of(range(10)))

    s3.put("more/part-0.parquet", parquet_bytes(images(ids_of(range(10, 12)))))
    appended = vb_batch.annotate(s3_job(s3, s3.url("more/"), {**out, "mode": "append"}))
    assert appended.success and appended.rows_processed == 2
    assert_each_id_once(out, ids_of(range(12)))

    s3.put("other/part-0.parquet", parquet_bytes(images(ids_of(range(20, 23)))))
    replaced = vb_batch.annotate(s3_job(s3, s3.url("other/"), {**out, "mode": "overwrite"}))
    assert replaced.success and replaced.rows_processed == 3
    assert_each_id_once(out, ids_of(range(20, 23)))
    lake_readers_agree(fmt, out, ids_of(range(20, 23)))
    keys = s3.keys()
    assert not any("/_vb/staging/" in k or "/_vb/intents/" in k or k.endswith("/_vb/lease.json") for k in keys), keys
    if fmt == "parquet":
        assert "labels/_SUCCESS" in keys
    if fmt == "iceberg":
        assert not side_files(seaweed, out)  # no `_vb/`, no marker, no records: only data files and metadata


@pytest.mark.slow  # ~1.2 s each
@pytest.mark.parametrize("fmt", FORMATS)
def test_retry_failed_re_runs_the_rows_whose_images_were_missing(fmt, s3, seaweed):
    missing = {3, 6, 7}
    for n in set(range(10)) - missing:
        s3.put(f"imgs/img-{n}.png", painting(n))
    ids = ids_of(range(10))
    s3.put("in/uris.parquet", parquet_bytes(pa.table({"id": ids, "uri": [s3.url(f"imgs/{i}.png") for i in ids]})))
    out = output_on(fmt, s3, seaweed)
    cfg = s3_job(s3, s3.url("in/uris.parquet"), out, run={"progress": False, "max_error_fraction": 1.0})
    first = vb_batch.annotate(cfg)
    assert first.rows_failed == 3 and first.errors_by_code == {"not_found": 3}

    for n in missing:  # the operator puts the missing images in place
        s3.put(f"imgs/img-{n}.png", painting(n))
    assert vb_batch.annotate(cfg).rows_processed == 0  # a plain resume: failed rows count as done
    retry = {**cfg, "run": {**cfg["run"], "retry_failed": True}}
    summary = vb_batch.annotate(retry)
    assert summary.success and (summary.rows_processed, summary.rows_ok, summary.rows_skipped) == (3, 3, 7)
    assert_each_id_once(out, ids)
    lake_readers_agree(fmt, out, ids)
    if fmt == "iceberg":
        assert not side_files(seaweed, out)


def side_files(seaweed, out: dict) -> list[str]:
    """Objects of an Iceberg output's namespace in the table bucket outside its tables' data and metadata."""
    found = seaweed.table_objects(out["table"].split(".")[0] + "/")
    return [k for k in found if k.split("/")[2] not in ("data", "metadata")]


def lease_records(s3, seaweed, out: dict) -> list[str]:
    """The lease records of `out`: objects in its bucket or, for Iceberg, the table property `vb.writer`."""
    if out["format"] == "iceberg":
        table = iceberg_table(iceberg_catalog(out["catalog"], StorageOptions(**out["storage"])), out["table"])
        return [table.properties["vb.writer"]] if table is not None and "vb.writer" in table.properties else []
    return [k for k in s3.keys(out["path"].split("/", 3)[3] + "/") if k.endswith("/_vb/lease.json")]


@pytest.mark.slow  # ~2 s each: a gated child holds the lease
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_writer_is_refused_naming_the_holder(fmt, s3, seaweed, tmp_path):
    ids = ids_of(range(12))
    s3.put("in/images.parquet", parquet_bytes(images(ids)))
    out = output_on(fmt, s3, seaweed)
    cfg = s3_job(s3, s3.url("in/images.parquet"), {**out, "mode": "overwrite"})
    gated = {**cfg, "model": {"backend": "crashing_job:GatedBackend", "batch_size": 4,
                              "options": {"gate": str(tmp_path / "gate")}}}
    (tmp_path / "gated.yaml").write_text(yaml.safe_dump(gated))
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(tmp_path / "gated.yaml")],
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not lease_records(s3, seaweed, out):  # the first run holds the output, its model waits at the gate
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        with pytest.raises(LeaseHeldError, match=f"being written by run .*pid {first.pid}"):
            vb_batch.annotate(cfg)  # the same overwrite, fired twice
        assert len(lease_records(s3, seaweed, out)) == 1
    finally:
        (tmp_path / "gate").touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    assert_each_id_once(out, ids)
    assert not lease_records(s3, seaweed, out)  # released


def test_iceberg_input_through_the_rest_catalog_resumes_with_only_new_rows(s3, seaweed):
    namespace = f"t{uuid.uuid4().hex[:10]}"
    catalog = iceberg_catalog(seaweed.catalog(), StorageOptions(**s3.storage))
    catalog.create_namespace(namespace)
    source = catalog.create_table(f"{namespace}.images", schema=images(ids_of(range(1))).schema)
    source.append(images(ids_of(range(5))))
    assert source.location().startswith(f"s3://{seaweed.table_bucket}/")
    inp = {"format": "iceberg", "table": f"{namespace}.images", "catalog": seaweed.catalog(), "storage": s3.storage}
    out = {"format": "parquet", "path": s3.url("labels"), "storage": s3.storage}
    cfg = {**job("unused", out), "input": inp}
    assert vb_batch.annotate(cfg).rows_ok == 5
    source.append(images(ids_of(range(5, 8))))  # a new snapshot
    summary = vb_batch.annotate(cfg)
    assert summary.success and (summary.rows_skipped, summary.rows_processed) == (5, 3)
    assert_each_id_once(out, ids_of(range(8)))


@pytest.mark.slow
def test_every_engine_writes_the_stages_output_to_s3(engine, s3, tmp_path):
    from conftest import write_painted_input
    from test_engine_contract import ROWS, comparable, stages_in_one_batch
    from test_engine_contract import job as contract_job

    write_painted_input(tmp_path / "in.parquet")
    s3.put("in/images.parquet", (tmp_path / "in.parquet").read_bytes())
    cfg = contract_job(s3.url("in/images.parquet"), s3.url(f"labels-{engine}"), engine)
    cfg["input"]["storage"] = cfg["output"]["storage"] = s3.storage
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.engine == engine and (summary.rows_ok, summary.rows_failed) == (ROWS - 2, 2)
    out = read_output(s3.url(f"labels-{engine}"), storage=StorageOptions(**s3.storage))
    expected = stages_in_one_batch(cfg)
    assert out.schema.names == expected.schema.names
    assert comparable(out).equals(comparable(expected))
    keys = s3.keys(f"labels-{engine}/")
    assert f"labels-{engine}/_SUCCESS" in keys and not any("/_vb/staging/" in k for k in keys)


@pytest.mark.slow  # ~2 s: a server of its own
def test_the_server_is_killed_and_its_folder_removed_even_when_a_test_fails():
    from seaweed_server import seaweed_server

    with pytest.raises(RuntimeError, match="a failing test"):
        with seaweed_server() as server:
            assert server.startup_seconds < 30 and server.root.is_dir()
            assert server.new_bucket().put("k", b"v")
            raise RuntimeError("a failing test")
    assert server.process.returncode is not None  # reaped: gone, not a zombie
    assert not server.root.exists()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on its S3 port any more
        socket.create_connection(("127.0.0.1", int(server.endpoint_url.rsplit(":", 1)[1])), timeout=5)


def test_a_catalog_table_with_the_default_report_still_runs_and_resumes(s3, seaweed, caplog):
    """A table bucket refuses the report file in the table location: a warning, never a failed run."""
    out = {**output_on("iceberg", s3, seaweed), "report": True}
    s3.put("in/part-0.parquet", parquet_bytes(images(ids_of(range(3)))))
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        first = vb_batch.annotate(s3_job(s3, s3.url("in/"), out))
        again = vb_batch.annotate(s3_job(s3, s3.url("in/"), out))  # nothing to do: looks for the report
    assert first.success and first.rows_ok == 3
    assert again.success and again.rows_skipped == 3 and again.rows_processed == 0
    assert "could not write the run report" in caplog.text
    assert_each_id_once(out, ids_of(range(3)))
