"""The config reference: every job key with its type, default and meaning, generated from the pydantic models.

`docs/config.md` (`vb-batch config-reference > docs/config.md`, kept current by
tests/test_config_reference.py) and the epilog of `vb-batch run --help` are
rendered from it. Two parts:

- `config_reference()`: the sections of `vb_batch.config.JobConfig` flattened to
  dotted keys (`output.mode`), the `model:` keys every backend shares included;
- `backend_reference()`: each built-in backend's own `model.<key>`s, from its
  options model (`vb_batch.models.options`); a key set for a backend that does
  not declare it is a config error, so the reference says which backend takes what.

Meanings are the fields' `description=`; a field without one fails the tests.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vb_batch.config import JobConfig


@dataclass
class ConfigKey:
    key: str  # dotted, e.g. output.mode
    type: str
    default: str
    meaning: str


def config_reference(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[ConfigKey]:
    """Every key of the job config (sections flattened to dotted keys), with type, default and meaning.

    >>> keys = {k.key: k for k in config_reference()}
    >>> keys["output.mode"].type, keys["output.mode"].default
    ('error | overwrite | append | resume', 'error')
    >>> keys["input.storage.endpoint_url"].meaning.startswith("S3-compatible endpoint")
    True
    """
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_reference(annotation, key + ".")
            continue
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "required"
        else:
            value = info.default_factory() if info.default_factory is not None else info.default
            default = json.dumps(value, default=str) if not isinstance(value, str) else value or '""'
            default = "null" if value is None else default
        keys.append(ConfigKey(key, _type_name(annotation), default, info.description or ""))
    return keys


def backend_reference() -> dict[str, list[ConfigKey]]:
    """The built-in backends' own keys (`model.<key>`), by backend name, in the registry's order.

    >>> reference = backend_reference()
    >>> [k.key for k in reference["demo"]]
    ['model.processing_resolution']
    >>> {k.key: k.default for k in reference["gemini"]}["model.mode"]
    'online'
    """
    from vb_batch.models.base import BACKENDS, options_model
    from vb_batch.models.options import BUILTIN_OPTIONS

    added = BACKENDS.added()  # registered at run time (a user's, a test's): not part of the package's reference
    return {
        name: config_reference(options_model(name), "model.")
        for name, target in BACKENDS.entries.items()
        if name not in added and target in BUILTIN_OPTIONS
    }


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def render_config_reference(markdown: bool = False) -> str:
    """The reference as text (for `run --help`) or as the Markdown page docs/config.md."""
    keys = config_reference()
    backends = backend_reference()
    if markdown:
        return _markdown(keys, backends)
    every = keys + [k for own in backends.values() for k in own]
    width = max(len(k.key) for k in every)

    def line(k: ConfigKey) -> str:
        return f"  {k.key:{width}}  {k.meaning} [{k.type}; default {k.default}]"

    lines = [line(k) for k in keys]
    for name, own in backends.items():
        lines.append(f"model keys of backend {name}:" + ("" if own else " none beyond the ones above"))
        lines += [line(k) for k in own]
    return "\n".join(lines)


def _markdown(keys: list[ConfigKey], backends: dict[str, list[ConfigKey]]) -> str:
    def table(rows: list[ConfigKey]) -> list[str]:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        return ["| key | type | default | meaning |", "|---|---|---|---|"] + [
            f"| `{k.key}` | {cell(k.type)} | `{cell(k.default)}` | {cell(k.meaning)} |" for k in rows
        ]

    lines = [
        "# Job config reference",
        "",
        ("<!-- Generated by `vb-batch config-reference > docs/config.md` from the pydantic models in "
         "vb_batch/config.py and vb_batch/models/options.py; do not edit by hand. -->"),
        "",
        ("Every key of a job config (YAML sections; override any as `key.path=value`), with its type, default "
         "and meaning."),
        "",
        *table(keys),
        "",
        "## Model keys of each backend",
        "",
        ("Beside the `model.*` keys above, which every backend takes, each backend has keys of its own. A key "
         "set (to anything but null) for a backend that does not use it is an error naming the backends that do "
         "(`model.vertex: not used by backend 'identity' (used by: gemini)`). A backend of your own "
         "(`model.backend: package.module:Class`) declares its keys as `options_model`, a "
         "`vb_batch.models.options.BackendOptions` subclass; one that declares none takes `model.options` "
         "(a free-form mapping) only."),
    ]
    for name, own in backends.items():
        lines += ["", f"### `{name}`", ""]
        lines += table(own) if own else ["No keys of its own."]
    return "\n".join(lines) + "\n"
