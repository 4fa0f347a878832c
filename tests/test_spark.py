"""The Spark engine on real executor processes (`local-cluster[2,1,1024]`): same output as local."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import known_maps, png_bytes, write_painted_input
from output_safety import assert_each_id_once, write_images
from s3_server import SECRET, s3_server, use_fake_credentials

import vb_batch
from vb_batch.codecs import depth, segmentation
from vb_batch.config import ConfigError, StorageOptions
from vb_batch.engines.spark import chain, report_name
from vb_batch.io.outputs import read_output
from vb_batch.models.identity import IdentityBackend

pytestmark = pytest.mark.slow

TESTS = str(Path(__file__).resolve().parent)


def job(tmp_path, out, engine, **extra):
    legend = segmentation.Legend.from_names(["road", "car", "sky"])
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / out), "mode": "overwrite", "rows_per_file": 4},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"classes": list(legend.names)},
        "model": {"backend": "identity", "batch_size": 2},
        "engine": {"kind": engine},
        "run": {"progress": False},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    return cfg, legend


def comparable(path: str) -> pa.Table:
    table = read_output(path).sort_by("id")
    return table.drop_columns(["vb_run_id"])


def test_model_loads_once_per_python_worker(spark, tmp_path):
    loads, batches = tmp_path / "loads.log", tmp_path / "batches.log"
    cfg, legend = job(
        tmp_path, "out", "spark",
        model__backend="worker_backends:CountingBackend",
        model__options={"load_log": str(loads), "batch_log": str(batches)},
    )
    write_painted_input(tmp_path / "in.parquet")
    assert vb_batch.annotate(cfg).rows_processed == 12
    load_pids = loads.read_text().split()
    batch_pids = [line.split()[0] for line in batches.read_text().splitlines()]
    assert len(load_pids) == len(set(load_pids)), "a worker loaded the model twice"
    assert set(batch_pids) <= set(load_pids)
    assert len(batch_pids) >= 3 * len(load_pids)  # many batches per load


def test_annotate_a_users_dataframe(spark, tmp_path):
    legend = segmentation.Legend.from_names(["road", "car", "sky"])
    maps = known_maps(3, 16, 24, legend)
    pq.write_table(
        pa.table({"id": [1, 2], "image": [png_bytes(depth.encode(maps["depth"]))] * 2}), tmp_path / "in.parquet"
    )
    df = spark.read.parquet(str(tmp_path / "in.parquet"))
    import vb_batch.spark

    out = vb_batch.spark.annotate(df, {"input": {"image_column": "image"}, "output": {"encoding": "array"}, "model": {"backend": "identity"}})
    assert out.schema["depth"].metadata["vb.unit"] == "m"
    rows = out.select("id", "depth", "depth_median_m", "vb_error").orderBy("id").collect()
    assert [r["id"] for r in rows] == [1, 2] and rows[0]["vb_error"] is None
    cell = rows[0]["depth"].asDict()
    got = np.frombuffer(cell["data"], dtype=cell["dtype"]).reshape(cell["shape"])
    np.testing.assert_allclose(got, maps["depth"], rtol=0.01)


def test_spark_reads_and_writes_s3(spark, tmp_path, monkeypatch):
    use_fake_credentials(monkeypatch)
    write_painted_input(tmp_path / "in.parquet")
    with s3_server() as s3:
        s3.put("raw/images.parquet", (tmp_path / "in.parquet").read_bytes())
        cfg, _ = job(tmp_path, "unused", "spark")
        cfg["input"] = {"path": s3.url("raw/images.parquet"), "storage": s3.storage}
        cfg["output"].update(path=s3.url("labels/v1"), storage=s3.storage)
        summary = vb_batch.annotate(cfg)
        assert summary.success and summary.rows_processed == 12
        keys = s3.keys("labels/v1/")
        assert "labels/v1/_SUCCESS" in keys and not [k for k in keys if "/_vb/staging/" in k]
        remote = read_output(s3.url("labels/v1"), storage=StorageOptions(**s3.storage)).sort_by("id")
        for key in keys:
            assert SECRET.encode() not in s3.get(key)
    cfg, _ = job(tmp_path, "local", "local")
    assert vb_batch.annotate(cfg).success
    assert remote.drop_columns(["vb_run_id"]).equals(comparable(str(tmp_path / "local")))


def test_gpu_resource_profile(spark):
    from vb_batch.config import EngineConfig
    from vb_batch.engines.spark import gpu_profile

    assert gpu_profile(EngineConfig(kind="spark")) is None
    profile = gpu_profile(EngineConfig(kind="spark", gpus_per_task=0.5))
    assert profile.taskResources["gpu"].amount == 0.5
    assert profile.taskResources["cpus"].amount == 1


def test_executors_run_model_calls_at_the_same_time(spark, tmp_path):
    """Two executors, several units: model calls overlap in time (the driver does not take one partition at a time)."""
    log = tmp_path / "calls.log"
    cfg, _ = job(tmp_path, "out", "spark", model__backend="worker_backends:TimedBackend",
                 model__options={"seconds": 0.4, "log": str(log)}, model__batch_size=3)
    cfg["tasks"] = ["depth"]
    write_painted_input(tmp_path / "in.parquet", rows=24)  # 8 row groups of 3: 8 units
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_processed == 24
    calls = [tuple(map(float, line.split()[1:])) for line in log.read_text().splitlines()]
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    overlapping = sum(1 for i, (s1, e1) in enumerate(calls) for s2, e2 in calls[i + 1:] if s1 < e2 and s2 < e1)
    assert len(pids) >= 2 and overlapping >= 2, (pids, calls)



class DiesMidUnitBackend(IdentityBackend):
    """identity, `model.options.seconds` per call, each call logged as "<pid> <rows>"; the Python worker
    dies (as an OOM kill would) on its `model.options.die_at`-th call, once (`model.options.marker`)."""

    name = "dies-mid-unit"
    calls = 0

    def predict(self, images, prompts, task, seeds):
        opts = self.cfg.options
        time.sleep(float(opts["seconds"]))
        DiesMidUnitBackend.calls += 1
        if DiesMidUnitBackend.calls == opts["die_at"] and not os.path.exists(opts["marker"]):
            open(opts["marker"], "w").close()
            os._exit(1)
        with open(opts["log"], "a") as log:
            log.write(f"{os.getpid()} {len(images)}\n")
        return super().predict(images, prompts, task, seeds)


def test_a_retried_task_starts_where_its_published_files_end(spark, tmp_path):
    """One unit of 30 rows; its first attempt publishes files as the time rule cuts them, then its worker
    dies: the retry does only the rows after the published ones, and every id is committed once."""
    ids = write_images(tmp_path / "in.parquet", 30)
    log = tmp_path / "calls.log"
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "mode": "overwrite", "rows_per_file": 1024, "commit_every": 0,
                   "commit_every_s": 0.4, "report": False},
        "tasks": ["depth"],
        "model": {"backend": "test_spark:DiesMidUnitBackend", "batch_size": 2,
                  "options": {"seconds": 0.15, "die_at": 9, "log": str(log), "marker": str(tmp_path / "died")}},
        "engine": {"kind": "spark"},
        "run": {"progress": False},
    }
    summary = vb_batch.annotate(cfg)
    assert (tmp_path / "died").exists() and summary.success and summary.rows_processed == 30
    rows_by_pid: dict[str, int] = {}
    for line in log.read_text().splitlines():
        pid, rows = line.split()
        rows_by_pid[pid] = rows_by_pid.get(pid, 0) + int(rows)
    first, *rest = rows_by_pid.values()
    # The dead attempt answered 16 rows, of which it published some; the retry redid only the others.
    assert rest and first == 16 and first + sum(rest) < 30 + 16, rows_by_pid
    assert_each_id_once(cfg["output"], ids)


class MemoryLoggingBackend(IdentityBackend):
    """identity, each call logged as "<pid> <unique MB> <threads>" to `model.options.log`."""

    name = "memory-logging"

    def predict(self, images, prompts, task, seeds):
        import threading

        import psutil

        uss = psutil.Process().memory_full_info().uss / 2**20
        with open(self.cfg.options["log"], "a") as log:
            log.write(f"{os.getpid()} {uss:.1f} {threading.active_count()}\n")
        return super().predict(images, prompts, task, seeds)


def test_a_python_worker_keeps_nothing_of_its_tasks(spark, tmp_path):
    """16 units of 3 rows on 2 reused Python workers: at its last tasks a worker has the threads and (within
    noise) the memory it had at its second, so a task's threads, queues and rows end with the task."""
    log = tmp_path / "calls.log"
    cfg, _ = job(tmp_path, "out", "spark", model__backend="test_spark:MemoryLoggingBackend",
                 model__options={"log": str(log)}, model__batch_size=3)
    cfg["tasks"] = ["depth"]
    write_painted_input(tmp_path / "in.parquet", rows=48)  # 16 row groups of 3: 16 units
    summary = vb_batch.annotate(cfg)
    assert summary.success and summary.rows_processed == 48
    calls: dict[str, list[tuple[float, int]]] = {}
    for line in log.read_text().splitlines():
        pid, uss, threads = line.split()
        calls.setdefault(pid, []).append((float(uss), int(threads)))
    busy = [pid_calls for pid_calls in calls.values() if len(pid_calls) >= 6]
    assert busy, calls  # a worker ran several tasks (Python workers are reused)
    for pid_calls in busy:
        early, late = pid_calls[1:3], pid_calls[-2:]  # the first call comes before the first decode and encode
        assert max(t for _, t in late) == max(t for _, t in early), pid_calls
        assert max(u for u, _ in late) <= max(u for u, _ in early) + 16, pid_calls


def test_report_chains_follow_rows_and_take_the_first_of_rival_attempts():
    names = [report_name(3, 0, 4, 7), report_name(3, 4, 2, 7), report_name(3, 4, 5, 9), report_name(3, 6, 3, 7),
             report_name(3, 12, 1, 7)]
    assert chain(names) == (names[:2] + [names[3]], 9)  # 12 does not follow on from 9
    assert chain(names, 9) == ([], 9) and chain([]) == ([], 0)


def test_speculation_is_refused(tmp_path):
    write_painted_input(tmp_path / "in.parquet")
    cfg, _ = job(tmp_path, "out", "spark", engine__spark_conf={"spark.speculation": "true"})
    with pytest.raises(ConfigError, match="engine.spark_conf: spark.speculation"):
        vb_batch.annotate(cfg)
