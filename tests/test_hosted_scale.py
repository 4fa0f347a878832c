"""Hosted generalists at archive scale (issue 33): the real SDKs against loopback servers (tests/hosted_servers.py).

Batch jobs run concurrently and a killed run re-attaches to each; a 12 MP photo is sized for the
model and never sent over the 20 MB inline limit; a stalled poll is one job-level retry; a daily
quota stops the run cleanly (exit code 4) and the resume goes on; the tokens the service reports
are kept per row and summed in the summary, and the estimate uses the same prices; a 3:1 panorama
is padded to the model's nearest ratio and cropped back, its boundaries where the model put them.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google import genai  # noqa: F401 - imported once here: the timings below measure the run, not the import
from PIL import Image

import vb_batch
from hosted_servers import GeminiServer, OpenAIServer, gemini_image_tokens, start_job_process
from vb_batch import cli
from vb_batch.codecs import depth as depth_codec
from vb_batch.config import ModelConfig
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend
from vb_batch.models.hosted_limits import GEMINI_RATIOS_1K, limits_for
from vb_batch.models.quota import RateLimiter

KEY = "AIza-scale-k3y-51e0"
OPENAI_KEY = "sk-scale-k3y-77"


@pytest.fixture(autouse=True)
def key(monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_SCALE_KEY", KEY)
    monkeypatch.setenv("OPENAI_SCALE_KEY", OPENAI_KEY)
    caplog.set_level(logging.INFO)


@pytest.fixture(autouse=True)
def our_log_handlers():
    yield
    root = logging.getLogger()  # what `cli.main` installed writes to the captured stderr, closed after the test
    for handler in [h for h in root.handlers if getattr(h, "_vb_batch", False)]:
        root.removeHandler(handler)


@pytest.fixture
def gemini():
    with GeminiServer(KEY) as server:
        yield server


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def table(tmp_path, images: list[np.ndarray], name="in.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(images))],
                             "image": pa.array([png(im) for im in images], pa.binary())}), path)
    return path


def depth_paintings(n: int, height: int, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Paintings of depth maps with sharp vertical boundaries (blocks of 1..8 m), and the maps."""
    maps = []
    for i in range(n):
        block = np.repeat(np.arange(1, 9, dtype=np.float32) + i, -(-width // 8))[:width]
        maps.append(np.tile(block, (height, 1)))
    return [depth_codec.encode(m) for m in maps], maps


def job(input_path, output_path, server, output_mode="overwrite", **model):
    return {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": output_mode, "encoding": "array", "lease_seconds": 2, "report": False},
        "tasks": ["depth"],
        "model": {"backend": "gemini", "model_name": "gemini-2.5-flash-image", "token_env": "GEMINI_SCALE_KEY",
                  "profile": "vision-banana", "endpoint": server.url, "retry_backoff_s": 0.01, "batch_size": 1,
                  "batch_poll_s": 0.05, **model},
        "run": {"progress": False, "max_error_fraction": 1.0},
    }


# ---------------------------------------------------------------------------- concurrent batch jobs


def test_batch_jobs_run_concurrently(tmp_path, gemini):
    paintings, _ = depth_paintings(4, 32, 32)
    source = table(tmp_path, paintings)
    model = {"mode": "batch", "batch_jobs_in_flight": 4, "request_size": "input"}
    # The same run with jobs that end at once: what the run costs besides waiting for jobs (on this machine).
    baseline = vb_batch.annotate(job(source, tmp_path / "baseline", gemini, **model))
    assert baseline.rows_ok == 4, baseline.render()
    gemini.batches.clear()
    gemini.batch_creations = 0
    gemini.job_seconds = 1.0
    summary = vb_batch.annotate(job(source, tmp_path / "out", gemini, **model))
    assert summary.rows_ok == 4, summary.render()
    assert gemini.batch_creations == 4  # 4 jobs' worth of rows (batch_size 1)
    spans = sorted((b["created"], b["ended"]) for b in gemini.batches.values())
    overlapping = max(sum(1 for c, e in spans if c <= start < e) for start, _ in spans)
    assert overlapping >= 2, spans
    assert spans[-1][1] - spans[0][0] <= 1.5 * gemini.job_seconds  # not 4 jobs one after another
    # Waiting for 4 jobs added about one job's time to the run, not four.
    waited = summary.wall_seconds["processing"] - baseline.wall_seconds["processing"]
    assert waited <= 1.5 * gemini.job_seconds, (summary.wall_seconds, baseline.wall_seconds)


@pytest.mark.slow
def test_a_run_killed_with_jobs_in_flight_resumes_without_submitting_or_billing_twice(tmp_path, gemini):
    gemini.hold = True
    paintings, maps = depth_paintings(4, 32, 32)
    config = job(table(tmp_path, paintings), tmp_path / "out", gemini,
                 **{"mode": "batch", "batch_jobs_in_flight": 4})
    child = start_job_process(config, tmp_path)
    state = tmp_path / "out" / "_vb" / "hosted"
    deadline = time.monotonic() + 60
    try:
        while sum(bool(json.loads(p.read_text()).get("name")) for p in state.glob("gemini-*.json")) < 4:
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never recorded its 4 jobs"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert gemini.batch_creations == 4  # all 4 in flight at once
    gemini.release()
    config["output"]["mode"] = "resume"
    summary = vb_batch.annotate(config)
    assert summary.success and summary.rows_ok == 4, summary.render()
    assert gemini.batch_creations == 4  # re-attached to every recorded job: none created twice
    out = read_output(str(tmp_path / "out"))
    assert sorted(out.column("id").to_pylist()) == ["r0", "r1", "r2", "r3"]
    usage = out.column("vb_usage").to_pylist()
    assert [u["output_tokens"] for u in usage] == [1290] * 4  # each image billed once
    assert summary.usage["output_tokens"] == 4 * 1290


# ---------------------------------------------------------------------------- requests sized for the model


def photo_12mp() -> np.ndarray:
    """A 4000x3000 photo-like image: smooth gradients under sensor noise (its PNG is far over 20 MB)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:3000, 0:4000]
    base = np.stack([x / 16, y / 12, (x + y) / 28], axis=-1)
    return (base + rng.normal(0, 40, (3000, 4000, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("mode, request_size", [("batch", "model"), ("online", "input")])
def test_a_12_mp_photo_is_sent_within_the_inline_limit(tmp_path, gemini, mode, request_size):
    gemini.inline_limit = 20_000_000
    photo = photo_12mp()
    assert len(png(photo)) * 4 / 3 > gemini.inline_limit  # as it is, it would be refused
    summary = vb_batch.annotate(job(table(tmp_path, [photo]), tmp_path / "out", gemini,
                                    **{"mode": mode, "request_size": request_size}))
    assert summary.rows_ok == 1, summary.render()
    out = read_output(str(tmp_path / "out"))
    assert out.column("vb_error").to_pylist() == [None]
    (values,) = vb_batch.load_arrays(out, "depth")
    assert values.shape == (3000, 4000)  # labelled at the photo's size
    assert 0 < gemini.largest_request <= gemini.inline_limit
    if request_size == "model":  # 4:3 -> the model's 4:3 size, asked for
        assert gemini.sent_sizes == [(864, 1184)]


def test_a_stalled_poll_is_one_job_level_retry(tmp_path, gemini):
    gemini.stall_polls, gemini.stall_s = 1, 1.5
    paintings, maps = depth_paintings(4, 24, 24)
    started = time.monotonic()
    summary = vb_batch.annotate(job(table(tmp_path, paintings), tmp_path / "out", gemini,
                                    **{"mode": "batch", "batch_size": 4, "timeout_s": 0.4, "max_retries": 3}))
    assert summary.rows_ok == 4, summary.render()
    assert gemini.batch_creations == 1
    # One stalled poll, then one that answers: not (max_retries + 1) polls per row.
    assert gemini.polls <= 3, gemini.polls
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------- quota


def test_a_daily_quota_stops_the_run_cleanly_and_the_resume_goes_on(tmp_path, gemini, capsys):
    gemini.daily_quota = 2
    paintings, _ = depth_paintings(6, 24, 24)
    config = job(table(tmp_path, paintings), tmp_path / "out", gemini, max_retries=4)
    config["output"]["commit_every"] = 1
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    started = time.monotonic()
    code = cli.main(["run", str(path)])
    assert code == cli.EXIT_QUOTA == 4
    assert time.monotonic() - started < 10  # not each row waiting out its retries
    said = capsys.readouterr().err
    assert "quota exhausted" in said and "output.mode=resume" in said and KEY not in said
    assert gemini.served == 3  # two answered, the third refused: no row retried it
    committed = read_output(str(tmp_path / "out")).num_rows if (tmp_path / "out").exists() else 0
    gemini.daily_quota = None  # the next day
    code = cli.main(["run", str(path), "output.mode=resume"])
    assert code == cli.EXIT_OK
    out = read_output(str(tmp_path / "out"))
    assert sorted(out.column("id").to_pylist()) == [f"r{i}" for i in range(6)]
    assert out.column("vb_error").null_count == 6
    assert len(gemini.requests) == 2 + 6 - committed  # committed rows were not asked again


def test_the_rate_limiter_paces_and_bounds_requests():
    limiter = RateLimiter(requests_per_minute=600, max_concurrent=None)  # one every 0.1 s
    started = time.monotonic()
    for _ in range(5):
        with limiter.request():
            pass
    assert 0.35 <= time.monotonic() - started < 2


# ---------------------------------------------------------------------------- usage and cost


def test_usage_per_row_the_run_total_and_the_estimate_agree(tmp_path, gemini):
    paintings, _ = depth_paintings(3, 40, 40)  # square: the estimate's 1:1 size
    summary = vb_batch.annotate(job(table(tmp_path, paintings), tmp_path / "out", gemini))
    assert summary.rows_ok == 3, summary.render()
    out = read_output(str(tmp_path / "out"))
    usage = out.column("vb_usage").to_pylist()
    assert {u["output_tokens"] for u in usage} == {1290}
    assert {u["input_tokens"] for u in usage} == {gemini_image_tokens(1024, 1024) + u["input_tokens"] - 1032
                                                 for u in usage}
    row_costs = [u["cost"] for u in usage]
    assert all(c > 0 for c in row_costs)
    assert summary.usage["cost"] == pytest.approx(sum(row_costs), rel=1e-4)
    assert summary.usage["output_tokens"] == 3 * 1290
    # The estimate made before the run, at the same token prices, is what the service billed (the prompt's
    # few text tokens aside).
    assert summary.estimate["total"] == pytest.approx(summary.usage["cost"], rel=0.01)
    assert "billed:" in summary.render()
    record = json.loads((tmp_path / "out" / "_vb" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["usage"] == summary.usage


def test_token_prices_are_configurable_and_batch_is_half_price():
    base = {"backend": "gemini", "model_name": "gemini-2.5-flash-image"}
    from vb_batch.models.gemini import GeminiBackend

    online = GeminiBackend.cost_estimate(ModelConfig(**base), rows=100, passes=1)
    batch = GeminiBackend.cost_estimate(ModelConfig(**base, mode="batch"), rows=100, passes=1)
    assert online["tokens_per_request"]["output_tokens"] == 1290
    assert online["total"] == pytest.approx(100 * (1032 * 0.30 + 1290 * 30.0) / 1e6)
    assert batch["total"] == pytest.approx(online["total"] / 2)
    mine = GeminiBackend.cost_estimate(ModelConfig(**base, token_prices={"output": 15.0}), rows=100, passes=1)
    assert mine["total"] == pytest.approx(100 * (1032 * 0.30 + 1290 * 15.0) / 1e6)


# ---------------------------------------------------------------------------- fixed aspect ratios


def test_a_panorama_comes_back_at_3_to_1_with_its_boundaries_in_place(tmp_path, gemini):
    gemini.ratios = dict(GEMINI_RATIOS_1K)  # the model answers only in its ratios, scene undistorted
    paintings, maps = depth_paintings(1, 64, 192)  # 3:1
    summary = vb_batch.annotate(job(table(tmp_path, paintings), tmp_path / "out", gemini))
    assert summary.rows_ok == 1, summary.render()
    assert gemini.answered_ratios == ["21:9"]  # asked for the nearest ratio
    assert gemini.sent_sizes == [(672, 1536)]  # padded to it (black bands), not stretched
    out = read_output(str(tmp_path / "out"))
    (values,) = vb_batch.load_arrays(out, "depth")
    assert values.shape == (64, 192)
    # Every block boundary where the painting had it: columns differ from the truth only at a boundary.
    wrong = np.abs(values - maps[0]) > 0.05 * maps[0]
    assert wrong[:, 2:-2].mean() < 0.03, np.argwhere(wrong.any(axis=0)).ravel()
    meta = out.schema.field("depth").metadata or {}
    assert b"pad" in meta.get(b"vb.model_fit", b"")


def test_openai_gpt_image_1_asks_for_its_nearest_size_and_keeps_usage():
    with OpenAIServer(OPENAI_KEY) as server:
        server.fixed_sizes = True
        backend = create_backend(ModelConfig(backend="openai", model_name="gpt-image-1", token_env="OPENAI_SCALE_KEY",
                                             endpoint=server.url + "/v1", retry_backoff_s=0.01))
        painting, truth = depth_paintings(1, 60, 180)
        [answer] = backend.predict(painting, ["p"], "depth", [5])
        assert server.forms[0]["size"] == "1536x1024"  # 3:2, the nearest of its three sizes
        # The answer cropped to the image's box: the panorama's aspect, its boundaries in place.
        assert abs(answer.shape[1] / answer.shape[0] - 3.0) < 0.05
        usage = backend.take_usage(5)
        assert usage["output_tokens"] == 4160 and usage["cost"] == pytest.approx((850 * 10 + 4160 * 40) / 1e6)
    assert limits_for("openai", "gpt-image-1").inline_bytes == 50_000_000
