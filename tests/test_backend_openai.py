"""The `openai` backend: the real openai SDK's `images.edit` against a loopback images API (tests/hosted_servers.py).

The server paints like an identity model; tests script 429 with Retry-After, 500s,
moderation refusals, answers without an image and answers at another size.
"""

from __future__ import annotations

import base64
import logging
import time

import numpy as np
import pytest

import vb_batch
from hosted_servers import OpenAIServer, _json, png
from vb_batch.config import ConfigError, ModelConfig
from vb_batch.errors import QuotaExhaustedError
from vb_batch.io.outputs import read_output
from vb_batch.models.base import create_backend
from vb_batch.models.openai_images import OpenAIImagesBackend

KEY = "sk-openai-k3y-91ab"


@pytest.fixture(autouse=True)
def key(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def images_api():
    with OpenAIServer(KEY) as server:
        yield server


def model_cfg(server, **extra):
    return {"backend": "openai", "model_name": "gpt-image-test", "token_env": "OPENAI_TEST_KEY",
            "endpoint": server.url + "/v1", "profile": "vision-banana", "retry_backoff_s": 0.01, "batch_size": 4,
            **extra}


def error(status, code, message, headers=None):
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers)


def test_edits_decode_to_the_painted_maps_at_any_answer_size(painted_table, images_api, tmp_path, caplog):
    paths, truth = painted_table
    # Every other answer comes at twice the input's size: mapped back to the input's.
    sizes = iter(range(10**6))
    images_api.paint = lambda image, form: {"b64_json": base64.b64encode(
        png(image.repeat(2, 0).repeat(2, 1) if next(sizes) % 2 else image)).decode()}
    backend = create_backend(ModelConfig(**model_cfg(images_api, options={"size": "1024x1024", "quality": "high"})))
    config = {"input": {"path": str(paths["depth"])},
              "output": {"path": str(tmp_path / "out"), "mode": "overwrite", "encoding": "array", "report": False},
              "tasks": ["depth"], "model": model_cfg(images_api), "run": {"progress": False}}
    summary = vb_batch.annotate(config, backend=backend)
    assert summary.success and summary.rows_ok == len(truth["depth"]), summary.render()
    table = read_output(str(tmp_path / "out"))
    for row_id, values in zip(table.column("id").to_pylist(), vb_batch.load_arrays(table, "depth")):
        assert values.shape == truth["depth"][row_id].shape
        # Mapped back by the decode stage's bilinear resize: exact inside, blended at the borders.
        assert np.median(np.abs(values / truth["depth"][row_id] - 1)) < 0.02
    assert set(table.column("vb_model").to_pylist()) == {f"openai:gpt-image-test+endpoint={images_api.url}/v1"}
    assert len(images_api.forms) == len(truth["depth"])
    assert {(f["model"], f["n"], f["size"], f["quality"]) for f in images_api.forms} == \
        {("gpt-image-test", "1", "1024x1024", "high")}
    shapes = [v.shape for v in truth["depth"].values()]
    assert sum(backend.answer_sizes.values()) == len(shapes)
    assert set(backend.answer_sizes) <= {s for h, w in shapes for s in ((h, w), (2 * h, 2 * w))}
    assert any(size not in shapes for size in backend.answer_sizes)  # some came at twice the size
    assert KEY not in caplog.text


def test_429_retry_after_is_honoured_and_500s_retried(images_api):
    backend = create_backend(ModelConfig(**model_cfg(images_api, max_retries=3)))
    image = np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    images_api.script = [error(429, "rate_limit_exceeded", "slow down", {"Retry-After": "0.4"}),
                         error(500, "server_error", "boom")]
    started = time.monotonic()
    [answer] = backend.predict([image], ["p"], "depth", [3])
    assert time.monotonic() - started >= 0.4
    np.testing.assert_array_equal(answer, image)
    assert len(images_api.forms) == 3

    images_api.script = [error(500, "server_error", "boom")] * 4
    [answer] = backend.predict([image], ["p"], "depth", [3])
    assert answer.code == "model_http_error" and "after 4 attempt(s)" in answer.message
    # No quota left: waiting won't help, and it is no row's fault: the run stops (exit code 4).
    images_api.script = [error(429, "insufficient_quota", "no quota left")]
    with pytest.raises(QuotaExhaustedError, match="insufficient_quota"):
        backend.predict([image], ["p"], "depth", [3])


@pytest.mark.parametrize("scripted, code", [
    (error(400, "moderation_blocked", "Your request was rejected by the safety system."), "model_safety_block"),
    (_json(200, {"created": 1, "data": []}), "model_no_image"),
    (_json(200, {"created": 1, "data": [{"url": "https://files.example.com/x.png"}]}), "model_no_image"),
    (_json(200, {"created": 1, "data": [{"b64_json": base64.b64encode(b"not an image").decode()}]}),
     "model_bad_answer"),
])
def test_refusals_and_answers_without_an_image_are_row_errors(images_api, scripted, code):
    backend = create_backend(ModelConfig(**model_cfg(images_api)))
    image = np.zeros((8, 8, 3), np.uint8)
    images_api.script = [scripted]
    first, second = backend.predict([image, image], ["p", "p"], "depth", [1, 2])
    errors = [a for a in (first, second) if not isinstance(a, np.ndarray)]
    assert len(errors) == 1 and errors[0].code == code


def test_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match="model.model_name"):
        OpenAIImagesBackend(ModelConfig(backend="openai", token_env="OPENAI_TEST_KEY"))
    with pytest.raises(ConfigError, match="model.token_env"):  # OpenAI's own API needs a key
        OpenAIImagesBackend(ModelConfig(backend="openai", model_name="gpt-image-1"))
    with pytest.raises(ConfigError, match="model.options"):
        OpenAIImagesBackend(ModelConfig(backend="openai", model_name="m", token_env="OPENAI_TEST_KEY",
                                        options={"prompt": "x"}))
    # A self-hosted server that needs no key.
    assert OpenAIImagesBackend(ModelConfig(backend="openai", model_name="m", endpoint="http://127.0.0.1:9/v1"))
