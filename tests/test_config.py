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
    err = capsys.readouterr().err
    assert "model.backend: unknown backend 'nope'" in err
    assert "model.backend: required" not in err  # said once: the unknown name, not the missing default


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
    # Relative paths resolve against the YAML's folder (tmp_path), never the working directory's out/.
    path = write(tmp_path, "input: {path: in.parquet}\noutput: {path: out}\nmodel: {backend: identity}\n")
    assert main(["validate", "--live", str(path)]) == 2
    err = capfd.readouterr().err
    assert "output.prefix" in err and "depth" in err and "Traceback" not in err
    assert main(["validate", "--live", str(path), "output.prefix=vb_"]) == 0


# ---------------------------------------------------------------------------- each backend owns its keys

from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from vb_batch.config import JobConfig, ModelConfig  # noqa: E402
from vb_batch.models import options as backend_options  # noqa: E402
from vb_batch.models.base import (  # noqa: E402
    BACKENDS,
    ModelBackend,
    backend_class,
    groups_by_size,
    model_id,
    options_model,
    register_backend,
    working_resolution,
)

CONF = sorted((Path(__file__).resolve().parent.parent / "conf").glob("*.yaml"))
MISPLACED = {"backend": "identity", "vertex": True, "mode": "batch", "endpoint": "https://painter.example.com/v1",
             "transformer_path": "org/transformer"}


def test_a_key_the_backend_does_not_use_is_an_error_naming_who_uses_it():
    with pytest.raises(ConfigError) as err:
        load_config({"input": {"path": "imgs"}, "model": MISPLACED})
    lines = str(err.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "model.vertex: not used by backend 'identity' (used by: gemini)",
        "model.mode: not used by backend 'identity' (used by: gemini)",
        "model.endpoint: not used by backend 'identity' (used by: gemini, http, openai)",
        "model.transformer_path: not used by backend 'identity' (used by: diffusers)",
    ]
    # The same keys are fine where they belong; a misspelt one is unknown to every backend.
    assert load_config({"input": {"path": "imgs"}, "model": {"backend": "gemini", "model_name": "m", "vertex": True,
                                                             "project": "p", "location": "global"}}).model.vertex
    # null sets nothing (a template's `endpoint:`), so it is not misplaced.
    assert "endpoint" not in load_config({"input": {"path": "imgs"},
                                          "model": {"backend": "identity", "endpoint": None}}).model.model_dump()
    with pytest.raises(ConfigError, match=r"model\.vertx: unknown key"):
        load_config({"input": {"path": "imgs"}, "model": {"backend": "gemini", "vertx": True}})


def test_backend_keys_are_checked_by_the_backends_model_with_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        load_config({"input": {"path": "imgs"}, "tasks": ["segmentation"],
                     "model": {"backend": "http", "endpoint": "ftp://x", "concurrency": 0, "compile": True,
                               "batch_size": 0}})
    text = str(err.value)
    for line in ("model.batch_size: Input should be greater than 0",
                 "model.endpoint: must be an http:// or https:// URL with a host",
                 "model.concurrency: Input should be greater than 0",
                 "model.compile: not used by backend 'http' (used by: diffusers, marigold)",
                 "task 'segmentation' needs segmentation.classes or segmentation.legend"):
        assert line in text, text


def test_what_a_backend_needs_is_said_with_the_rest_of_the_config():
    with pytest.raises(ConfigError) as err:
        load_config({"input": {"path": "imgs"}, "tasks": ["referring"],
                     "model": {"backend": "gemini", "vertex": True, "mode": "batch"}})
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [
        "model.model_name: the gemini backend needs the model id, e.g. gemini-2.5-flash-image",
        "model.mode: the Vertex AI Batch API reads and writes Cloud Storage or BigQuery, which vb_batch does not "
        "drive; use mode: online or the Gemini Developer API",
        "task 'referring' needs referring.phrase or referring.phrase_column",
    ]
    for backend, needs in (("diffusers", "needs one checkpoint"), ("demo", "serves every task from one checkpoint")):
        with pytest.raises(ConfigError, match=f"model.path: the {backend} backend {needs}"):
            load_config({"input": {"path": "imgs"}, "model": {"backend": backend, "path": {"depth": "d"}}})
    with pytest.raises(ConfigError, match="model.model_name: the openai backend needs the model id, e.g. gpt-image-1"):
        backend_class("openai")(ModelConfig(backend="openai"))  # a backend made without a job checks the same


@pytest.mark.parametrize("config", CONF, ids=[p.name for p in CONF])
def test_every_example_config_validates_and_survives_its_own_dump(config):
    cfg = load_config(config)
    given = yaml.safe_load(config.read_text())["model"]
    assert {key: getattr(cfg.model, key) for key in given} == given  # every key kept, none renamed
    again = JobConfig.model_validate(cfg.model_dump(mode="json"))  # what run records and the plan's sample re-read
    assert again.model.model_dump() == cfg.model.model_dump()


def test_the_model_section_dumps_the_backends_keys_only():
    identity = load_config({"input": {"path": "imgs"}, "model": {"backend": "identity"}}).model
    assert set(identity.model_dump()) == set(ModelConfig.model_fields) | {"options"}
    http = ModelConfig(backend="http", endpoint="https://painter.example.com/v1").model_dump()
    assert set(http) == set(ModelConfig.model_fields) | set(backend_options.HttpOptions.model_fields)
    assert http["max_retries"] == 4 and "vertex" not in http


def test_reading_an_unused_key_gives_its_default_and_setting_one_is_refused():
    model = ModelConfig(backend="identity")
    assert model.processing_resolution is None and model.options == {} and model.max_retries == 4
    with pytest.raises(AttributeError):
        model.no_such_key  # noqa: B018
    with pytest.raises(ValueError, match="not used by backend 'identity'"):
        model.vertex = True
    assert "vertex" not in model.model_dump()
    gemini = ModelConfig(backend="gemini", model_name="m")
    gemini.mode = "batch"
    assert gemini.mode == "batch" and gemini.model_dump()["mode"] == "batch"
    with pytest.raises(ValueError, match="mode"):
        gemini.mode = "sometimes"
    assert gemini.mode == "batch"


def test_each_builtin_backend_declares_the_options_config_validation_uses():
    for name, target in BACKENDS.entries.items():
        if isinstance(target, str) and target in backend_options.BUILTIN_OPTIONS:
            assert backend_class(name).options_model is backend_options.BUILTIN_OPTIONS[target], name
    # One declaration per key: a key several backends take has one type and default; none shadows a common key.
    seen: dict[str, object] = {}
    for options in backend_options.BUILTIN_OPTIONS.values():
        for key, info in options.model_fields.items():
            assert key not in ModelConfig.model_fields, key
            default = info.get_default(call_default_factory=True)
            assert seen.setdefault(key, (info.annotation, default)) == (info.annotation, default), key


class _Options(backend_options.BackendOptions):
    strength: float = 1.0


class _OwnKeys(ModelBackend):
    options_model = _Options

    def predict(self, images, prompts, task, seeds):
        return list(images)


class _Undeclared(ModelBackend):
    def predict(self, images, prompts, task, seeds):
        return list(images)


@pytest.fixture
def own_backends():
    register_backend("own-keys", _OwnKeys, replace=True)
    register_backend("undeclared", _Undeclared, replace=True)
    yield
    BACKENDS.unregister("own-keys")
    BACKENDS.unregister("undeclared")


def test_a_users_backend_declares_its_keys_or_takes_model_options_only(own_backends):
    assert ModelConfig(backend="own-keys", strength=0.5).strength == 0.5
    assert options_model("own-keys") is _Options
    with pytest.raises(ConfigError) as err:
        load_config({"input": {"path": "imgs"}, "model": {"backend": "own-keys", "strength": "high", "options": {}}})
    assert "model.strength: Input should be a valid number" in str(err.value)
    assert "model.options: not used by backend 'own-keys' (used by: " in str(err.value)
    # Declaring none: the free-form `model.options` reaches it, and nothing else.
    assert ModelConfig(backend="undeclared", options={"gate": "x"}).options == {"gate": "x"}
    with pytest.raises(ConfigError, match=r"model\.strength: not used by backend 'undeclared' \(used by: own-keys\)"):
        load_config({"input": {"path": "imgs"}, "model": {"backend": "undeclared", "strength": 1.0}})


@pytest.mark.parametrize("model, resolution, by_size", [
    ({"backend": "identity"}, None, False),
    ({"backend": "http", "endpoint": "https://p.example.com/"}, None, False),
    ({"backend": "gemini", "model_name": "m"}, None, False),
    ({"backend": "openai", "model_name": "m"}, None, False),
    ({"backend": "marigold", "path": "m"}, None, True),  # the checkpoint's default: known once loaded
    ({"backend": "marigold", "path": "m", "processing_resolution": 768}, 768, True),
    ({"backend": "diffusers", "path": "m"}, 1024, True),
    ({"backend": "diffusers", "path": "m", "processing_resolution": 512}, 512, True),
    ({"backend": "diffusers", "path": "m", "processing_resolution": 0}, None, True),
    ({"backend": "demo"}, None, True),
    ({"backend": "demo", "processing_resolution": 96}, 96, True),
])
def test_working_resolution_and_grouping_come_from_the_backend(model, resolution, by_size):
    cfg = ModelConfig(**model)
    assert working_resolution(cfg) == resolution
    assert groups_by_size(cfg) is by_size


@pytest.mark.parametrize("model, expected", [
    ({"backend": "identity"}, "identity"),
    ({"backend": "marigold", "path": {"normals": "n", "depth": "d"}, "revision": "abc"},
     "marigold:depth=d,normals=n@abc"),
    ({"backend": "http", "endpoint": "https://painter.example.com/v1?key=s"}, "http:https://painter.example.com/v1"),
    ({"backend": "gemini", "model_name": "g", "vertex": True, "endpoint": "https://proxy.example.com/?k=1",
      "revision": "r"}, "gemini:g+endpoint=https://proxy.example.com/+vertex@r"),
    ({"backend": "openai", "model_name": "gpt-image-1"}, "openai:gpt-image-1"),
    ({"backend": "diffusers", "path": "base", "revision": "r1", "transformer_path": "ft", "transformer_subfolder": "t",
      "transformer_revision": "r2"}, "diffusers:base@r1+transformer=ft/t@r2"),
])
def test_provenance_is_the_backends(model, expected):
    assert model_id(ModelConfig(**model)) == expected
