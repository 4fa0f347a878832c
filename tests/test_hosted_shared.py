"""Hosted models over a whole run (issue 33): one rate limiter for every worker, batch jobs never created
twice across a kill, calls in flight stopped when a run fails. The real SDKs against tests/hosted_servers.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
import urllib.error
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hosted_servers import GeminiServer, start_job_process
from PIL import Image

import vb_batch
from vb_batch.codecs import depth as depth_codec
from vb_batch.config import load_config
from vb_batch.errors import QuotaExhaustedError
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend
from vb_batch.models.quota import RateLimiter
from vb_batch.models.quota_share import HttpBook, driver_rate_limiter, remote_book
from vb_batch.pipeline.loop import annotate_stream
from vb_batch.pipeline.resolved import ResolvedJob

KEY = "AIza-shared-k3y-7c1"
SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("image", pa.binary())])


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def paintings_table(path, rows: int, row_group: int | None = None, size: int = 16):
    images = [png(depth_codec.encode(np.full((size, size), 1.0 + i, np.float32))) for i in range(rows)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "image": pa.array(images, pa.binary())}), path,
                   row_group_size=row_group)
    return path


def most_in_a_window(times: list[float], window: float) -> int:
    """The most requests the server saw within any `window` seconds."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))


def gemini_job(input_path, output_path, server, token_env, **model):
    return {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "encoding": "array", "report": False},
        "tasks": ["depth"],
        "model": {"backend": "gemini", "model_name": "gemini-2.5-flash-image", "token_env": token_env,
                  "profile": "vision-banana", "endpoint": server.url, "retry_backoff_s": 0.01,
                  "request_size": "input", **model},
        "run": {"progress": False},
    }


# ---------------------------------------------------------------------------- one rate limiter per run


@pytest.mark.slow
def test_two_ray_model_actors_together_stay_under_requests_per_minute(ray_local, tmp_path, caplog):
    # The key variable every Ray worker has (set before Ray started): workers read the key from their own environment.
    token_env = "AWS_ACCESS_KEY_ID"
    caplog.set_level(logging.INFO)
    with GeminiServer(os.environ[token_env]) as server:
        source = paintings_table(tmp_path / "in.parquet", rows=12, row_group=2)
        config = gemini_job(source, tmp_path / "out", server, token_env, batch_size=2, concurrency=2,
                            requests_per_minute=240)  # one request every 0.25 s, over the run
        config["engine"] = {"kind": "ray", "actors": 2, "cpus_per_actor": 0.5, "cpus_per_task": 0.5,
                            "cpu_batch_rows": 2}
        summary = vb_batch.annotate(config)
        assert summary.rows_ok == 12, summary.render()
        times = server.request_times
    assert len(times) == 12
    # 240 a minute is 4 a second: 5 within a second at most (the window's two ends); each actor pacing
    # itself at that rate would let both send theirs in the same second.
    assert most_in_a_window(times, 1.0) <= 5, np.diff(sorted(times)).round(3)
    assert "Ray actor vb-rate-" in caplog.text


def test_workers_share_the_driver_token_server_and_its_limits():
    """Spark's shape: the book behind an HTTP server on the driver; two workers' limiters (own proxies) share it."""
    plan = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(requests_per_minute=1200,
                                                                     max_concurrent_requests=2)))
    sent, in_flight, most = [], [0], [0]
    lock = threading.Lock()

    def worker(limiter: RateLimiter):
        for _ in range(3):
            with limiter.request():
                with lock:
                    sent.append(time.monotonic())
                    in_flight[0] += 1
                    most[0] = max(most[0], in_flight[0])
                time.sleep(0.12)  # longer than the spacing: the concurrency limit is what holds them back
                with lock:
                    in_flight[0] -= 1

    with driver_rate_limiter(plan, {"spark.driver.host": "127.0.0.1"}) as address:
        assert address.startswith("http://127.0.0.1:") and plan.rate_limiter == address
        workers = [RateLimiter(1200, 2, remote_book(address)) for _ in range(2)]  # as two executors' processes
        threads = [threading.Thread(target=worker, args=(workers[i % 2],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert len(sent) == 12
        assert most[0] == 2  # never more in flight than the run allows, whichever worker sent them
        assert min(np.diff(sorted(sent))) >= 0.05 - 0.02  # 1200 a minute: one every 0.05 s over both
        workers[0].stop("the day's quota is gone")
        with pytest.raises(QuotaExhaustedError, match="day's quota"):  # the other worker hears it at once
            with workers[1].request():
                pass
        stranger = HttpBook(address.split("#")[0] + "#not-the-token")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            stranger.grant(1)
    assert plan.rate_limiter is None


# ---------------------------------------------------------------------------- batch jobs: the kill window


@pytest.mark.slow
def test_a_run_killed_between_creating_a_job_and_recording_it_finds_the_job_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_SHARED_KEY", KEY)
    with GeminiServer(KEY) as server:
        for i in range(3):  # other batches of the project, listed before ours: the job is found on page 2
            server.batches[f"batches/other{i}"] = {"model": "models/m", "displayName": f"theirs-{i}", "source": "",
                                                   "state": "BATCH_STATE_SUCCEEDED", "created": 0.0, "ended": 0.0}
        server.list_page_max = 2
        server.create_answer_gate = threading.Event()  # the job is created; its creator never hears back
        config = gemini_job(paintings_table(tmp_path / "in.parquet", rows=3), tmp_path / "out", server,
                            "GEMINI_SHARED_KEY", mode="batch", batch_size=4, batch_poll_s=0.05)
        child = start_job_process(config, tmp_path)
        deadline = time.monotonic() + 60
        try:
            while server.batch_creations < 1:
                assert child.poll() is None, child.stdout.read().decode()
                assert time.monotonic() < deadline, "the child never created its job"
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)  # exactly between the create and the record of the job's name
        finally:
            child.kill()
            child.wait()
        server.create_answer_gate.set()
        [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_vb" / "hosted").glob("gemini-*.json")]
        assert record["name"] is None and record["display_name"]  # the kill window: a job the record cannot name
        config["output"]["mode"] = "resume"
        summary = vb_batch.annotate(config)
        assert summary.success and summary.rows_ok == 3, summary.render()
        assert server.batch_creations == 1  # found by its display name: not created twice
        assert any("pageToken=2" in path for path in server.paths)  # the SDK's pager went to the next page
        assert len(server.sent_sizes) == 3  # each image painted, and billed, once
        out = read_output(str(tmp_path / "out"))
        assert sorted(out.column("id").to_pylist()) == ["r0", "r1", "r2"]
        assert [u["output_tokens"] for u in out.column("vb_usage").to_pylist()] == [1290] * 3
        [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_vb" / "hosted").glob("gemini-*.json")]
        assert record["name"] and record["state"] == "JOB_STATE_SUCCEEDED"


# ---------------------------------------------------------------------------- a failed run stops its calls


def test_a_failed_run_leaves_no_batch_job_polling(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_SHARED_KEY", KEY)
    with GeminiServer(KEY) as server:
        server.hold = True  # jobs stay RUNNING: their calls poll until they end or are told to stop
        cfg = load_config(gemini_job("in.parquet", tmp_path / "out", server, "GEMINI_SHARED_KEY", mode="batch",
                                     batch_size=1, batch_poll_s=0.05, batch_jobs_in_flight=2))
        cfg.input.min_side = 1
        cfg.model.state_url = str(tmp_path / "state")
        plan = ResolvedJob.build(cfg, SCHEMA, image_column="image", run_id="run-1")
        backend = create_backend(cfg.model)
        image = png(depth_codec.encode(np.full((8, 8), 2.0, np.float32)))

        def failing_input():
            for i in range(4):
                yield pa.RecordBatch.from_pylist([{"id": i, "image": image}], schema=SCHEMA)
            deadline = time.monotonic() + 20
            while server.batch_creations < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            raise OSError("object storage went away")

        with pytest.raises(OSError, match="went away"):
            list(annotate_stream(failing_input(), plan, backend))
        assert server.batch_creations >= 1
        deadline = time.monotonic() + 5
        while call_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call_threads() == []  # no call left polling its job
        polls = server.polls
        time.sleep(0.3)
        assert server.polls == polls
        # The backend (kept per process) still works for the next run: its calls are not cancelled.
        server.release()
        ok = [a.batch for a in annotate_stream([pa.RecordBatch.from_pylist([{"id": 9, "image": image}],
                                                                           schema=SCHEMA)], plan, backend)]
        assert ok[0].column("vb_error").to_pylist() == [None]


def call_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vb-model-call") and t.is_alive()]



def test_the_spark_session_serves_the_runs_limiter_from_the_driver(spark, tmp_path):
    """The Spark engine's session starts the token server where executors reach the driver, for the run only.

    (A whole Spark run, 8 rows over 2 executors at 240 a minute, was measured to stay at 5 requests a
    second at most too; it costs ~20 s here, so the suite checks the session's part and the server's.)
    """
    from types import SimpleNamespace as Run

    from vb_batch.engines.spark import SparkEngine

    config = gemini_job("in.parquet", tmp_path / "out", SimpleNamespace(url="http://127.0.0.1:9"), "GEMINI_SHARED_KEY",
                        requests_per_minute=600)
    config["engine"] = {"kind": "spark"}
    cfg = load_config(config)
    plan = ResolvedJob.build(cfg, SCHEMA, image_column="image", run_id="run-1")
    with SparkEngine().session(Run(cfg=cfg, plan=plan), None):
        address = plan.rate_limiter
        host = spark.sparkContext.getConf().get("spark.driver.host")
        assert address.startswith(f"http://{host}:")
        delays, stopped = remote_book(address).grant(3)
        assert stopped is None and np.allclose(np.diff(delays), 0.1)  # 600 a minute: 0.1 s apart
    assert plan.rate_limiter is None
