"""The config reference (docs/config.md, `vb-batch run --help`) is generated from the pydantic models: complete and current."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vb_batch.cli import build_parser, main
from vb_batch.config import JobConfig
from vb_batch.planning import config_reference, render_config_reference

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
