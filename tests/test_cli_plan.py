"""`vb-batch plan` / `validate`: every config mistake at once with no I/O, live checks that each run, an estimate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_bytes

import vb_batch
from vb_batch.cli import main

CONF = sorted((Path(__file__).resolve().parent.parent / "conf").glob("*.yaml"))


@pytest.fixture
def no_io(monkeypatch):
    """Opening an input or an output fails loudly: static checks must not try."""
    import vb_batch.io.formats
    import vb_batch.io.sources

    def refuse(*args, **kwargs):
        raise AssertionError("static checks opened the input or the output")

    monkeypatch.setattr(vb_batch.io.sources, "open_source", refuse)
    monkeypatch.setattr(vb_batch.io.formats, "open_sink", refuse)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def our_log_handlers():
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vb_batch", False)]:
        root.removeHandler(handler)


@pytest.mark.parametrize("config", CONF, ids=[p.name for p in CONF])
def test_every_example_config_passes_static_validate_and_plan(config, no_io, capsys):
    assert main(["validate", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["input"]  # the resolved config, printed
    assert main(["plan", str(config), "--static"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config: valid") and "vb_error" in out and "[kind=depth" in out


def test_every_semantic_error_at_once(tmp_path, no_io, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": "in.parquet", "max_pixels": 0, "colour": "red"},
        "output": {"mode": "replace"},
        "tasks": ["depth", "segmentation", "referring"],
        "model": {"batch_size": 0},
    }))
    expected = [
        "input.max_pixels: Input should be greater than 0",
        "input.colour: unknown key",
        "output.mode: Input should be 'error', 'overwrite', 'append' or 'resume'",
        "model.batch_size: Input should be greater than 0",
        "model.backend: required",
        "task 'segmentation' needs segmentation.classes or segmentation.legend",
        "task 'referring' needs referring.phrase or referring.phrase_column",
    ]
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert all(line in err for line in expected), err
    assert main(["plan", str(config)]) == 2
    out = capsys.readouterr().out
    assert "invalid job config (7 problem(s))" in out and all(line in out for line in expected), out
    # Backends that need weights or an endpoint say so before any I/O.
    problems = vb_batch.plan({"input": {"path": "x"}, "model": {"backend": "marigold"}}, live=False).problems
    assert problems == ["model.path: the marigold backend needs a checkpoint (directory or hub id)"]
    with pytest.raises(vb_batch.errors.ConfigError, match="model.endpoint: the http backend needs the URL"):
        vb_batch.validate({"input": {"path": "x"}, "model": {"backend": "http"}})


def test_a_misplaced_backend_key_exits_2_naming_each(tmp_path, no_io, capsys):
    # Issue 36's job: identity with Gemini's, the http backend's and a diffusers transformer's keys.
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": "in.parquet"},
        "model": {"backend": "identity", "vertex": True, "mode": "batch", "endpoint": "https://painter.example.com/v1",
                  "transformer_path": "org/transformer"},
    }))
    expected = [
        "vb-batch: model.vertex: not used by backend 'identity' (used by: gemini)",
        "model.mode: not used by backend 'identity' (used by: gemini)",
        "model.endpoint: not used by backend 'identity' (used by: gemini, http, openai)",
        "model.transformer_path: not used by backend 'identity' (used by: diffusers)",
    ]
    for command in ("validate", "plan", "run"):
        assert main([command, str(config)]) == 2, command
        captured = capsys.readouterr()
        text = captured.err + captured.out
        assert all(line.removeprefix("vb-batch: ") in text for line in expected), (command, text)
    # Where those keys belong they are fine (mode: batch aside, which Vertex AI does not take here).
    assert main(["validate", str(config), "model.backend=gemini", "model.endpoint=null", "model.mode=online",
                 "model.transformer_path=null", "model.model_name=gemini-test"]) == 0


def test_model_checks_are_the_backends_own(tmp_path, monkeypatch):
    from vb_batch.planning import model_checks

    monkeypatch.delenv("PAINTER_TOKEN", raising=False)
    http = vb_batch.validate({"input": {"path": "x"}, "model": {"backend": "http", "token_env": "PAINTER_TOKEN",
                                                                "endpoint": "https://painter.example.com/v1"}})
    [token] = model_checks(http)
    assert (token.name, token.status, token.fix_config) == ("model token", "error", True)
    assert "'PAINTER_TOKEN' is not set" in token.detail
    monkeypatch.setenv("PAINTER_TOKEN", "t")
    assert model_checks(http) == []
    saved = tmp_path / "klein"
    saved.mkdir()
    (saved / "model_index.json").write_text("{}")
    diffusers = vb_batch.validate({"input": {"path": "x"}, "model": {
        "backend": "diffusers", "path": str(saved), "transformer_path": str(tmp_path / "missing"), "device": "cpu"}})
    checks = {c.name: c for c in model_checks(diffusers)}
    assert checks["weights model.path"].status == "ok" and checks["device"].detail == "model.device cpu -> cpu"
    assert checks["weights model.transformer_path"].status == "error"
    # On a cluster the device is the workers' to check; a backend without weights checks none.
    on_ray = diffusers.model_copy(update={"engine": diffusers.engine.model_copy(update={"kind": "ray"})})
    assert "checked on the ray workers" in {c.name: c for c in model_checks(on_ray)}["device"].detail
    identity = vb_batch.validate({"input": {"path": "x"}, "model": {"backend": "identity", "path": str(saved)}})
    assert model_checks(identity) == []


def write_images(path: Path, n: int, ids: list | None = None, side: int = 16) -> Path:
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    pq.write_table(pa.table({"id": ids or [f"img{i}" for i in range(n)], "image": images}), path)
    return path


def test_live_checks_each_report_what_a_run_would_fail_on(tmp_path, capsys):
    source = write_images(tmp_path / "in.parquet", 4, ids=["a", "b", "b", "c"])
    out = tmp_path / "out"
    vb_batch.annotate({"input": {"path": str(write_images(tmp_path / "other.parquet", 2))},
                       "output": {"path": str(out), "report": False}, "model": {"backend": "identity"},
                       "run": {"progress": False}})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(source)}, "output": {"path": str(out), "mode": "error"},
        "model": {"backend": "marigold", "path": str(tmp_path / "no-such-checkpoint"), "device": "cuda"},
    }))
    assert main(["plan", str(config)]) == 2  # duplicate ids, missing weights, no GPU: the config must change
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith(("  ok", "  warning", "  error"))]
    by_name = {name: next(line for line in lines if name in line) for name in
               ("input readable", "input rows", "ids unique", "output mode", "weights model.path", "device")}
    assert by_name["input readable"].split()[0] == "ok"
    assert "4 rows" in by_name["input rows"]
    assert by_name["ids unique"].split()[0] == "error" and "'b' x2" in by_name["ids unique"]
    assert by_name["output mode"].split()[0] == "error" and "already holds data" in by_name["output mode"]
    assert by_name["weights model.path"].split()[0] == "error" and "does not exist" in by_name["weights model.path"]
    assert by_name["device"].split()[0] == "error" and "model.device" in by_name["device"]
    # The same job with mode resume over the same output, a unique input and no model faults: all ok.
    unique = write_images(tmp_path / "unique.parquet", 3)
    result = vb_batch.plan(str(config), [f"input.path={unique}", "model.backend=identity", "model.path=null",
                                         "model.device=cpu", "output.mode=overwrite"])
    assert result.ok, result.render()
    assert not result.schema_is_static and result.schema.field("depth").metadata[b"vb.unit"] == b"m"


def test_a_sample_run_projects_time_and_size(tmp_path, capsys):
    source = write_images(tmp_path / "in.parquet", 24, side=24)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": {"path": str(source)}, "output": {"path": str(out)},
                                      "tasks": ["depth", "normals"], "model": {"backend": "identity"},
                                      "run": {"progress": False}}))
    assert main(["plan", str(config), "--sample", "6", "--workers", "4", "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "sample: 6 rows" in text and "whole input (24 rows)" in text and "on 4 workers" in text
    estimate = json.loads((tmp_path / "e.json").read_text())
    assert estimate["sample_rows"] == 6 and estimate["rows"] == 24 and estimate["workers"] == 4
    assert estimate["seconds_per_image"] > 0 and estimate["bytes_per_row"] > 0
    assert estimate["seconds_on_cluster"] < estimate["seconds_here"]
    assert estimate["output_bytes"] == pytest.approx(estimate["bytes_per_row"] * 24, rel=1e-3)
    # Two tasks, 6 rows: 12 images answered, in full calls of model.batch_size 8 where rows allow.
    assert estimate["model_images"] == 12 and estimate["model_calls"] == 2
    assert "model: 2 calls of 6.0 images on average" in text
    assert not out.exists()  # the sample went to a temporary output: the job's own is untouched


def test_logging_flags_anywhere_with_level_names_and_json(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": {"path": "in.parquet"}, "model": {"backend": "identity"}}))
    log = logging.getLogger("vb_batch.test")
    assert main(["validate", str(config), "--log-format", "json", "-v"]) == 0  # after the command
    assert logging.getLogger().level == logging.INFO
    capsys.readouterr()
    log.info("hello %s", "world")
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["level"] == "INFO" and entry["message"] == "hello world" and entry["logger"] == "vb_batch.test"
    assert main(["-q", "validate", str(config)]) == 0  # before the command
    assert logging.getLogger().level == logging.ERROR
    assert main(["-vv", "validate", str(config)]) == 0
    capsys.readouterr()
    log.debug("details")
    assert " DEBUG vb_batch.test: details" in capsys.readouterr().err  # text lines carry the level name
    assert len([h for h in logging.getLogger().handlers if getattr(h, "_vb_batch", False)]) == 1
