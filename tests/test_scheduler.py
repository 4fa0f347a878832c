"""vb_batch under a scheduler: the exit codes and their table, the latest-run pointer, the cron wrapper
(`jobs/cron_job.sh`, a real process) and the Dagster asset (`jobs/dagster_assets.py`, materialised
in-process with the demo model). The Airflow DAG is only parsed: Airflow is not installed here."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_bytes

import vb_batch
import vb_batch.cli as cli
from vb_batch.io.lease import Lease
from vb_batch.io.outputs import read_output

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def job(tmp_path: Path, rows: int = 6, **sections) -> Path:
    rng = np.random.default_rng(1)
    images = [png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(rows)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "image": images}), tmp_path / "in.parquet")
    config = {"input": {"path": "in.parquet"}, "output": {"path": "out", "report": False},
              "model": {"backend": "identity", "batch_size": 2}, "run": {"progress": False}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_every_exit_code_is_in_the_operations_table():
    table = (ROOT / "docs" / "operations.md").read_text()
    codes = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert set(codes.values()) == {0, 1, 2, 3, 4, 130}
    rows = dict(re.findall(r"^\| `(\d+)` \| `(EXIT_\w+)` \|", table, re.M))
    assert {int(code): name for code, name in rows.items()} == {v: k for k, v in codes.items()}


def test_the_latest_run_pointer_names_each_run_record_in_turn(tmp_path):
    config = job(tmp_path)
    first = vb_batch.annotate(config)
    pointer_path = tmp_path / "out" / "_vb" / "latest-run.json"
    pointer = json.loads(pointer_path.read_text())
    assert pointer["run_id"] == first.run_id and pointer["success"] is True
    second = vb_batch.annotate(config, ["output.mode=resume"])  # nothing to do: still a run, with a record
    pointer = json.loads(pointer_path.read_text())
    assert pointer["run_id"] == second.run_id != first.run_id
    record = json.loads((tmp_path / "out" / pointer["record"]).read_text())
    assert record["run_id"] == second.run_id and record["rows_skipped"] == 6
    # The pointer is not a run record: `_vb/runs/` holds exactly the two runs' records.
    assert sorted(p.stem for p in (tmp_path / "out" / "_vb" / "runs").glob("*.json")) == sorted([first.run_id, second.run_id])


def test_a_run_that_lost_its_lease_leaves_the_pointer_alone(tmp_path):
    config = job(tmp_path)
    vb_batch.annotate(config)
    pointer_path = tmp_path / "out" / "_vb" / "latest-run.json"
    before = pointer_path.read_bytes()
    cfg = vb_batch.config.load_config(config, ["output.mode=append"])
    from vb_batch.engines.core import start_run

    run = start_run(cfg, "local")
    with run.sink.lease_held():
        lease_file = tmp_path / "out" / "_vb" / "lease.json"
        record = json.loads(lease_file.read_text())
        lease_file.write_text(json.dumps({**record, "token": "another-run", "run_id": "the-other-run"}))
        run.sink._write_run_record({"run_id": run.sink.run_id, "success": True})
    assert (tmp_path / "out" / "_vb" / "runs" / f"{run.sink.run_id}.json").exists()  # its own record is kept
    assert pointer_path.read_bytes() == before


def test_a_quota_stop_exits_4_and_a_resume_finishes(tmp_path, capsys):
    config = job(tmp_path, model={"backend": "job_backends:QuotaBackend", "batch_size": 2, "options": {"rows": 2}})
    assert cli.main(["run", str(config)]) == cli.EXIT_QUOTA
    assert "quota exhausted" in capsys.readouterr().err
    kept = read_output(str(tmp_path / "out")).num_rows
    assert kept < 6
    assert cli.main(["run", str(config), "output.mode=resume", "model.options.rows=100"]) == cli.EXIT_OK
    assert read_output(str(tmp_path / "out")).num_rows == 6


@pytest.mark.slow
def test_the_cron_wrapper_retries_a_held_lease_then_finishes(tmp_path):
    config = job(tmp_path)
    out = tmp_path / "out"
    vb_batch.annotate(config, ["output.mode=overwrite"])
    holder = Lease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id="the-other-run", seconds=60)
    holder.acquire()
    env = {**os.environ, "VB_BATCH": str(Path(sys.executable).with_name("vb-batch")), "VB_RETRY_AFTER_S": "1",
           "VB_RETRIES": "3", "PYTHONPATH": str(TESTS)}
    wrapper = subprocess.Popen(["bash", str(ROOT / "jobs" / "cron_job.sh"), str(config), "output.mode=append"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
    lines = []
    try:
        for line in wrapper.stdout:
            lines.append(json.loads(line))  # every line the wrapper and vb-batch write is one JSON object
            if lines[-1].get("event") == "cron":
                assert lines[-1]["exit_code"] == 3 and "retry 1 of 3" in lines[-1]["message"]
                holder.release()  # the other run finishes: the retry goes ahead
    finally:
        holder.release()
        wrapper.wait(timeout=60)
    assert wrapper.returncode == 0
    held = [e for e in lines if e.get("event") == "failure"]
    assert held and held[0]["exit_code"] == 3 and "the-other-run" in held[0]["message"]
    [summary] = [e for e in lines if e.get("event") == "summary"]
    assert summary["exit_code"] == 0 and summary["rows_ok"] == 6  # output.mode=append (overrides win)
    assert read_output(str(out)).num_rows == 12


@pytest.mark.slow
def test_the_cron_wrapper_passes_a_quota_stop_on(tmp_path):
    config = job(tmp_path, model={"backend": "job_backends:QuotaBackend", "batch_size": 2, "options": {"rows": 2}})
    env = {**os.environ, "VB_BATCH": str(Path(sys.executable).with_name("vb-batch")), "PYTHONPATH": str(TESTS)}
    done = subprocess.run(["bash", str(ROOT / "jobs" / "cron_job.sh"), str(config)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, timeout=120)  # as `>> log 2>&1`
    assert done.returncode == 4
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["exit_code"] for e in lines if e.get("event") == "failure"] == [4]
    assert lines[-1]["event"] == "cron" and lines[-1]["exit_code"] == 4 and "resumes" in lines[-1]["message"]


def load_dagster_recipe(monkeypatch, job_yaml: Path):
    pytest.importorskip("dagster")
    monkeypatch.setenv("VB_BATCH_JOB", str(job_yaml))
    spec = importlib.util.spec_from_file_location("dagster_assets", ROOT / "jobs" / "dagster_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_dagster_asset_materialises_a_demo_model_job_then_resumes(tmp_path, monkeypatch):
    from vb_batch.evaluation.scenes import write_scene_table

    write_scene_table(tmp_path / "scenes.parquet", 4, size=(48, 64))
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": "scenes.parquet", "image_column": "image"},
        "output": {"path": "labels", "report": False}, "tasks": ["depth", "segmentation"],
        "segmentation": {"classes": ["floor", "wall", "box", "sphere", "cylinder", "sky"]},
        "model": {"backend": "demo", "batch_size": 4, "device": "cpu"}, "run": {"progress": False},
    }))
    recipe = load_dagster_recipe(monkeypatch, config)
    import dagster as dg

    assert recipe.defs.resolve_job_def("vb_batch_nightly") is not None
    result = dg.materialize([recipe.image_labels])
    assert result.success
    [materialised] = result.asset_materializations_for_node("image_labels")
    meta = {key: value.value for key, value in materialised.metadata.items()}
    assert (meta["rows_ok"], meta["rows_failed"]) == (4, 0)
    labels = read_output(str(tmp_path / "labels"))
    assert labels.num_rows == 4 and "depth" in labels.column_names
    pointer = json.loads((tmp_path / "labels" / "_vb" / "latest-run.json").read_text())
    assert pointer["run_id"] == meta["run_id"]
    # The next materialisation resumes: every row is done, nothing is labelled twice.
    again = dg.materialize([recipe.image_labels])
    [second] = again.asset_materializations_for_node("image_labels")
    assert second.metadata["rows_skipped"].value == 4 and second.metadata["rows_ok"].value == 0
    assert read_output(str(tmp_path / "labels")).num_rows == 4


@pytest.mark.slow
def test_the_dagster_asset_asks_for_a_retry_while_another_run_holds_the_output(tmp_path, monkeypatch):
    config = job(tmp_path)
    recipe = load_dagster_recipe(monkeypatch, config)
    import dagster as dg

    vb_batch.annotate(config)
    out = tmp_path / "out"
    holder = Lease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id="the-other-run", seconds=60)
    asset = recipe.vb_batch_asset("held_labels", config, retry_after_s=0.5, lease_retries=1)
    with holder:
        result = dg.materialize([asset], raise_on_error=False)
    assert not result.success
    kinds = [event.event_type_value for event in result.all_events]
    assert "STEP_UP_FOR_RETRY" in kinds and kinds.count("STEP_FAILURE") == 1


def test_the_airflow_dag_parses():
    """Airflow is not installed here (docs/operations.md says so): the DAG file is at least valid Python
    that names the DAG and maps the quota stop to a skip."""
    source = (ROOT / "jobs" / "airflow_dag.py").read_text()
    ast.parse(source)
    assert 'dag_id="vb_batch_nightly"' in source and "AirflowSkipException" in source


def test_the_cron_wrapper_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "jobs" / "cron_job.sh")]).returncode == 0
