"""Config: YAML + overrides, validation that names the field, CLI exit codes."""

from __future__ import annotations

import pytest

from vb_batch.cli import main
from vb_batch.config import ConfigError, load_config, redacted


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, "input: {path: imgs}\nmodel: {backend: identity}\n"),
        ["model.batch_size=4", "tasks=[depth, normals]", "output.mode=resume", "segmentation.classes=[a, b]"],
    )
    assert cfg.model.batch_size == 4
    assert cfg.tasks == ["depth", "normals"]
    assert cfg.output.mode == "resume"
    assert cfg.segmentation.classes == ["a", "b"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.batch_size=-3", "model.batch_size"),
        ("tasks=[depth, sharpness]", "tasks"),
        ("output.mode=sometimes", "output.mode"),
        ("model.bach_size=4", "model.bach_size"),
        ("tasks=[segmentation]", "segmentation"),
        ("segmentation.legend={road: [300, 0, 0]}", "segmentation.legend"),
    ],
)
def test_bad_config_exits_2_and_names_the_field(tmp_path, capsys, override, field):
    path = write(tmp_path, "input: {path: imgs}\nmodel: {backend: identity}\n")
    assert main(["run", str(path), override]) == 2
    err = capsys.readouterr().err
    assert field in err


def test_missing_input_path_is_named(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, "tasks: [depth]\n"))]) == 2
    assert "input" in capsys.readouterr().err


def test_unknown_backend_is_a_config_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    text = f"input: {{path: {tmp_path / 'imgs'}}}\nmodel: {{backend: nope}}\n"
    assert main(["validate", str(write(tmp_path, text))]) == 2
    assert "model.backend" in capsys.readouterr().err


def test_help_lists_commands_and_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "demo", "tiny-model"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "output.mode" in capsys.readouterr().out


def test_secrets_are_redacted():
    cfg = load_config(
        {"input": {"path": "s3://b/x", "storage": {"options": {"key": "AKIA123", "secret": "shh", "token": "t0k"}}},
         "model": {"backend": "identity"}}
    )
    text = str(redacted(cfg))
    for secret in ("AKIA123", "shh", "t0k"):
        assert secret not in text
    assert "s3://b/x" in text


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_job_without_a_model_is_refused(tmp_path, capsys):
    """No silent identity default: a config without model.backend would write photo colours as metres."""
    assert main(["validate", str(write(tmp_path, "input: {path: imgs}\n"))]) == 2
    assert "model.backend: required" in capsys.readouterr().err


def test_image_formats_are_checked_against_what_can_be_decoded_safely():
    base = {"input": {"path": "x"}, "model": {"backend": "identity"}}
    assert load_config(base, ["input.image_formats=[png, ico]"]).input.image_formats == ["PNG", "ICO"]
    for formats in ("[JPG]", "[ICNS]", "[EPS]"):
        with pytest.raises(ConfigError, match="input.image_formats"):
            load_config(base, [f"input.image_formats={formats}"])


def test_validate_names_an_output_prefix_clash_without_a_traceback(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1], "image": [b"x"], "depth": [1.0]}), tmp_path / "in.parquet")
    path = write(tmp_path, f"input: {{path: {tmp_path / 'in.parquet'}}}\nmodel: {{backend: identity}}\n")
    assert main(["validate", "--live", str(path)]) == 2
    err = capfd.readouterr().err
    assert "output.prefix" in err and "depth" in err and "Traceback" not in err
    assert main(["validate", "--live", str(path), "output.prefix=vb_"]) == 0
