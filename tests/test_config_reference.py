"""The config reference (docs/config.md, `vb-batch run --help`) is generated from the pydantic models: complete and current."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vb_batch.cli import build_parser, main
from vb_batch.config import JobConfig
from vb_batch.config_reference import backend_reference, config_reference, render_config_reference
from vb_batch.models.base import BACKENDS
from vb_batch.models.options import BUILTIN_OPTIONS

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def leaf_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys |= leaf_keys(info.annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_key_has_a_type_a_default_and_a_meaning():
    reference = config_reference()
    assert {k.key for k in reference} == leaf_keys()
    undocumented = [k.key for k in reference if not k.meaning]
    assert not undocumented, f"add description= to these fields in vb_batch/config.py: {undocumented}"
    keys = {k.key: k for k in reference}
    assert (keys["output.mode"].type, keys["output.mode"].default) == ("error | overwrite | append | resume", "error")
    assert keys["model.batch_size"].default == "8" and keys["input.path"].default == '""'
    assert keys["model.backend"].default == "null" and "required" in keys["model.backend"].meaning


def test_every_backend_key_is_listed_under_its_backend_with_a_meaning():
    reference = backend_reference()
    assert set(reference) == {name for name, target in BACKENDS.entries.items() if target in BUILTIN_OPTIONS}
    for name, keys in reference.items():
        declared = BUILTIN_OPTIONS[BACKENDS.entries[name]].model_fields
        assert [k.key for k in keys] == [f"model.{key}" for key in declared], name
        assert all(k.meaning for k in keys), f"add description= to the options of backend {name!r}"
    gemini = {k.key: k for k in reference["gemini"]}
    assert (gemini["model.mode"].type, gemini["model.mode"].default) == ("online | batch", "online")
    assert "model.vertex" not in {k.key for keys in reference.values() if keys is not reference["gemini"] for k in keys}
    docs = DOCS.read_text()
    assert "### `gemini`" in docs and "| `model.vertex` |" in docs.split("### `gemini`")[1].split("###")[0]


def test_docs_config_md_is_current():
    # Regenerate with: vb-batch config-reference > docs/config.md
    assert DOCS.read_text() == render_config_reference(markdown=True), "run: vb-batch config-reference > docs/config.md"


def test_run_help_lists_every_key(capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    lines = help_text.splitlines()
    for key in leaf_keys():
        # One line per key, starting with it, carrying its default.
        assert any(line.split()[:1] == [key] and "default " in line for line in lines), key
    # The keys the first report found missing, by name.
    for key in ("output.keep_image", "output.commit_every", "output.rows_per_file", "input.max_pixels",
                "model.processing_resolution", "model.num_inference_steps", "engine.io_threads"):
        assert f"  {key} " in help_text
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out == DOCS.read_text()
