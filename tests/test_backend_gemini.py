"""The `gemini` backend: the real google-genai SDK against a loopback Gemini API (tests/hosted_servers.py).

The server paints like an identity model (it answers with the image it was sent), so codec
paintings decode back to the maps they encode; tests script 429s with RetryInfo, 500s,
text-only and blocked answers, answers at another size, and batches that fail, expire or
stay RUNNING while a run is killed and resumed.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import Counter

import numpy as np
import pytest

import vb_batch
from hosted_servers import GeminiServer, google_error, image_response, text_response, _json, start_job_process
from vb_batch.config import ConfigError, ModelConfig, load_config
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend, model_id
from vb_batch.models.gemini import GeminiBackend
from vb_batch.models.profiles import HOSTED_ZERO_SHOT_TEMPLATES

KEY = "AIza-gemini-k3y-7c1d"


@pytest.fixture(autouse=True)
def key(monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # everything any logger says is checked for the key


@pytest.fixture
def gemini():
    with GeminiServer(KEY) as server:
        yield server


def model_cfg(server, **extra):
    # The Vision Banana profile: an endpoint that serves its checkpoint paints metric depth on the walk.
    return {"backend": "gemini", "model_name": "gemini-test-image", "token_env": "GEMINI_TEST_KEY",
            "profile": "vision-banana",
            "endpoint": server.url, "retry_backoff_s": 0.01, "batch_size": 4, "batch_poll_s": 0.02, **extra}


def job(input_path, output_path, server, tasks=("depth",), mode="overwrite", **model):
    return {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": mode, "encoding": "array", "lease_seconds": 2,
                   "report": False},
        "tasks": list(tasks),
        "model": model_cfg(server, **model),
        "run": {"progress": False, "max_error_fraction": 1.0},
    }


def rows_by_id(table, task="depth"):
    return dict(zip(table.column("id").to_pylist(), zip(table.column("vb_error").to_pylist(),
                                                         vb_batch.load_arrays(table, task))))


def test_online_paintings_decode_to_the_painted_maps(painted_table, gemini, tmp_path, caplog):
    paths, truth = painted_table
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "out", gemini, options={"temperature": 0.0}))
    assert summary.success and summary.rows_ok == len(truth["depth"]), summary.render()
    table = read_output(str(tmp_path / "out"))
    for row_id, (error, values) in rows_by_id(table).items():
        assert error is None
        np.testing.assert_allclose(values, truth["depth"][row_id], rtol=0.02)
    assert set(table.column("vb_model").to_pylist()) == {"gemini:gemini-test-image+endpoint=" + gemini.url}
    assert len(gemini.requests) == len(truth["depth"])
    request = gemini.requests[0]
    assert request["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert request["generationConfig"]["temperature"] == 0.0
    parts = request["contents"][0]["parts"]
    assert parts[1]["inlineData"]["data"]  # the image, inline
    assert all(h.get("x-goog-api-key") == KEY for h in gemini.headers_seen)
    assert KEY not in caplog.text


def test_prompt_templates_are_overridable_in_config(painted_table, gemini, tmp_path):
    paths, _ = painted_table
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "default", gemini, profile=None))
    assert summary.success  # the backend's default profile: hosted zero-shot prompts, relative depth
    assert {r["contents"][0]["parts"][0]["text"] for r in gemini.requests} == {HOSTED_ZERO_SHOT_TEMPLATES["depth"]}
    assert set(read_output(str(tmp_path / "default")).column("vb_profile").to_pylist()) == {"hosted-zero-shot"}
    gemini.requests.clear()
    mine = "Paint the depth of this picture on the cube walk."
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "out", gemini, prompts={"depth": mine}))
    assert summary.success
    assert {r["contents"][0]["parts"][0]["text"] for r in gemini.requests} == {mine}
    with pytest.raises(ConfigError, match="model.prompts"):
        bad = job(paths["depth"], tmp_path / "bad", gemini, tasks=["segmentation"],
                  prompts={"segmentation": "no legend slot"})
        vb_batch.annotate({**bad, "segmentation": {"classes": ["road", "car"]}})


def test_429_with_retry_info_is_waited_out_and_500s_retried(gemini):
    backend = create_backend(ModelConfig(**model_cfg(gemini, max_retries=3)))
    image = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    gemini.script = [google_error(429, "RESOURCE_EXHAUSTED", "quota", retry_delay="0.4s"),
                     google_error(500, "INTERNAL", "boom")]
    started = time.monotonic()
    [answer] = backend.predict([image], ["p"], "depth", [7])
    assert time.monotonic() - started >= 0.4  # RetryInfo's delay, not the 0.01 s backoff
    np.testing.assert_array_equal(answer, image)
    assert len(gemini.requests) == 3

    gemini.script = [google_error(429, "RESOURCE_EXHAUSTED", "quota", retry_delay="0.01s")] * 4
    [answer] = backend.predict([image], ["p"], "depth", [7])
    assert answer.code == "model_rate_limited" and "after 4 attempt(s)" in answer.message
    gemini.script = [google_error(400, "INVALID_ARGUMENT", "bad request")]
    [answer] = backend.predict([image], ["p"], "depth", [7])
    assert answer.code == "model_http_error" and "400" in answer.message  # not retried
    assert len(gemini.requests) == 3 + 4 + 1


@pytest.mark.parametrize("answer, code, words", [
    (text_response("I can't draw that, but here is a description."), "model_no_image", "here is a description"),
    ({"promptFeedback": {"blockReason": "SAFETY"}}, "model_safety_block", "SAFETY"),
    ({"candidates": [{"finishReason": "IMAGE_SAFETY"}]}, "model_safety_block", "IMAGE_SAFETY"),
    (text_response("cut", finish="MAX_TOKENS"), "model_no_image", "MAX_TOKENS"),
    ({"candidates": []}, "model_no_image", "no candidates"),
])
def test_answers_without_an_image_are_row_errors(gemini, answer, code, words):
    backend = create_backend(ModelConfig(**model_cfg(gemini)))
    image = np.zeros((8, 8, 3), np.uint8)
    gemini.script = [_json(200, answer)]
    first, second = backend.predict([image, image], ["p", "p"], "depth", [1, 2])
    errors = [a for a in (first, second) if not isinstance(a, np.ndarray)]
    assert len(errors) == 1 and errors[0].code == code and words in errors[0].message


def test_an_answer_at_another_size_is_mapped_back_and_counted(painted_table, gemini, tmp_path):
    paths, truth = painted_table
    # The model answers at twice the input's size (nearest: the painting itself, upscaled).
    gemini.paint = lambda image, prompt, request: image_response(image.repeat(2, axis=0).repeat(2, axis=1))
    backend = create_backend(ModelConfig(**model_cfg(gemini)))
    summary = vb_batch.annotate(job(paths["depth"], tmp_path / "out", gemini), backend=backend)
    assert summary.success and summary.rows_ok == len(truth["depth"])
    for row_id, (error, values) in rows_by_id(read_output(str(tmp_path / "out"))).items():
        assert values.shape == truth["depth"][row_id].shape
        assert values.shape == truth["depth"][row_id].shape
        # Mapped back by the decode stage's bilinear resize: exact inside, blended at the borders.
        assert np.median(np.abs(values / truth["depth"][row_id] - 1)) < 0.02
    assert backend.answer_sizes == Counter((2 * v.shape[0], 2 * v.shape[1]) for v in truth["depth"].values())


def test_batch_mode_runs_jobs_and_reports_the_rows_a_batch_failed(painted_table, gemini, tmp_path):
    paths, truth = painted_table
    ids = sorted(truth["depth"])
    # The server fails the first three requests it answers (each image once).
    failing = set()

    def paint(image, prompt, request):
        if len(failing) < 3 and image.tobytes() not in failing:
            failing.add(image.tobytes())
            return ("error", 500, "internal error")
        return image_response(image)

    gemini.paint = paint
    config = job(paths["depth"], tmp_path / "out", gemini)
    config["model"]["mode"] = "batch"
    summary = vb_batch.annotate(config)
    assert summary.rows_ok == len(ids) - 3, summary.render()
    assert gemini.batch_creations == -(-len(ids) // 4)  # one job per model call of batch_size rows
    assert not gemini.requests  # nothing went online
    table = read_output(str(tmp_path / "out"))
    rows = rows_by_id(table)
    failed = {i for i, (error, _) in rows.items() if error}
    assert len(failed) == 3
    for row_id, (error, values) in rows.items():
        if row_id in failed:
            assert error["code"] == "model_batch_failed" and "internal error" in error["message"]
        else:
            np.testing.assert_allclose(values, truth["depth"][row_id], rtol=0.02)
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_vb" / "hosted").glob("gemini-*.json")]
    assert len(records) == gemini.batch_creations and all(r["state"] == "JOB_STATE_SUCCEEDED" for r in records)
    assert sum(len(r["failed_keys"]) for r in records) == 3


def test_an_expired_batch_is_an_error_of_each_of_its_rows(painted_table, gemini, tmp_path):
    paths, truth = painted_table
    gemini.outcome = "BATCH_STATE_EXPIRED"
    config = job(paths["depth"], tmp_path / "out", gemini)
    config["model"]["mode"] = "batch"
    summary = vb_batch.annotate(config)
    assert summary.rows_ok == 0
    codes = {e["code"] for e in read_output(str(tmp_path / "out")).column("vb_error").to_pylist()}
    assert codes == {"model_batch_expired"}


@pytest.mark.slow
def test_a_killed_batch_run_reattaches_to_its_job_on_resume(painted_table, gemini, tmp_path):
    paths, truth = painted_table
    gemini.hold = True  # the batch stays RUNNING until released
    config = job(paths["depth"], tmp_path / "out", gemini, batch_size=64)
    config["model"]["mode"] = "batch"
    child = start_job_process(config, tmp_path)
    state = tmp_path / "out" / "_vb" / "hosted"
    deadline = time.monotonic() + 60
    try:
        while not any(json.loads(p.read_text()).get("name") for p in state.glob("gemini-*.json")):
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never recorded its batch job"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert gemini.batch_creations == 1
    gemini.release()
    config["output"]["mode"] = "resume"
    summary = vb_batch.annotate(config)
    assert summary.success, summary.render()
    assert gemini.batch_creations == 1  # re-attached, not paid twice
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("id").to_pylist()) == sorted(truth["depth"])  # every id exactly once
    for row_id, (error, values) in rows_by_id(table).items():
        assert error is None
        np.testing.assert_allclose(values, truth["depth"][row_id], rtol=0.02)


def test_config_errors_name_the_field(gemini, monkeypatch):
    with pytest.raises(ConfigError, match="model.model_name"):
        GeminiBackend(ModelConfig(backend="gemini", token_env="GEMINI_TEST_KEY"))
    with pytest.raises(ConfigError, match="model.token_env"):
        GeminiBackend(ModelConfig(backend="gemini", model_name="m"))
    with pytest.raises(ConfigError, match="model.state_url"):  # set by the plan from output.path
        GeminiBackend(ModelConfig(backend="gemini", model_name="m", token_env="GEMINI_TEST_KEY", mode="batch"))
    monkeypatch.delenv("GEMINI_TEST_KEY")
    with pytest.raises(ConfigError, match="GEMINI_TEST_KEY"):
        GeminiBackend(ModelConfig(backend="gemini", model_name="m", token_env="GEMINI_TEST_KEY"))
    with pytest.raises(ConfigError, match="model.mode"):
        GeminiBackend(ModelConfig(backend="gemini", model_name="m", vertex=True, project="p", location="global",
                                  mode="batch"))
    with pytest.raises(ConfigError):
        load_config({"input": {"path": "x"}, "model": {"backend": "gemini", "mode": "sometimes"}})


def test_estimate_counts_requests_and_cost():
    cfg = ModelConfig(backend="gemini", model_name="gemini-test-image", mode="batch", price_per_image=0.0195)
    estimate = GeminiBackend.cost_estimate(cfg, rows=1000, passes=4)
    assert estimate["requests"] == estimate["images"] == 4000
    assert estimate["total"] == pytest.approx(78.0)
    assert estimate["mode"] == "batch" and estimate["model"] == model_id(cfg) == "gemini:gemini-test-image"
    assert GeminiBackend.cost_estimate(cfg.model_copy(update={"price_per_image": None}), 10, 1)["total"] is None


def test_the_estimate_is_printed_before_the_run_and_kept_in_its_record(painted_table, gemini, tmp_path, capsys):
    paths, truth = painted_table
    cfg = job(paths["depth"], tmp_path / "out", gemini, price_per_image=0.04)
    cfg["run"]["progress"] = True
    summary = vb_batch.annotate(cfg)
    rows = len(truth["depth"])
    assert summary.success and summary.estimate["requests"] == rows
    assert summary.estimate["total"] == pytest.approx(0.04 * rows)
    assert f"{rows} requests for {rows} rows" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "_vb" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["estimate"] == summary.estimate and "estimate:" in summary.render()
    # A resume counts only what is left: nothing.
    again = vb_batch.annotate({**cfg, "output": {**cfg["output"], "mode": "resume"}})
    assert again.estimate is None or again.estimate["requests"] == 0
