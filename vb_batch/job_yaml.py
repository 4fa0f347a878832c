"""A job YAML file as a config's plain data: `${VAR}` filled in from the environment, relative paths made absolute.

A job file is read the same from any working directory (cron runs from `$HOME`):

- **Substitution.** In every string value (never in keys), `${VAR}` is the environment
  variable's value and `${VAR:-default}` the default when VAR is unset or empty;
  `$${` is a literal `${`. It happens after the YAML is parsed, so a value is never read
  as YAML structure: it stays a string, which the config's types convert
  (`batch_size: ${BATCH}` is a number). An unset variable without a default is a
  `ConfigError` naming the key and the variable (every one at once).
- **Secrets.** A value taken from a variable whose name looks secret (`API_TOKEN`,
  `DB_PASSWORD`; `masking.is_secret_name`) is registered with `masking.register_secret`:
  masked by value wherever the config or a message is shown or stored, even under a key
  with an innocent name.
- **Paths.** A relative local path resolves against the folder of the YAML file:
  `input.path`, `output.path`, `model.state_url`, an Iceberg catalog's `warehouse` and a
  SQLite catalog `uri` (`sqlite:///lake/catalog.db`). A checkpoint (`model.path`, one per
  task too, and `model.transformer_path`) resolves only when it starts with `./` or `../`
  or exists next to the YAML: otherwise it is a hub id (`black-forest-labs/FLUX.2-klein-base-4B`).
  URLs (`s3://`, `http://`, anything with `://`) and absolute paths never change.

`key.path=value` overrides on the command line are not part of the file: `load_config`
applies them afterwards, as given, so their paths are the working directory's, as a user
typing them expects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vb_batch.errors import ConfigError
from vb_batch.masking import is_secret_name, register_secret

# $${ (a literal ${), ${VAR} or ${VAR:-default}; a default holds no '}'.
_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SQLITE = "sqlite:///"


def read_job_yaml(path: str | Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job file at `path` as plain data, variables substituted and paths resolved (module docstring)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    data = substitute_variables(data, os.environ if environ is None else environ, str(path))
    return resolve_paths(data, path.absolute().parent)


def substitute_variables(data: Any, environ: Mapping[str, str], source: str = "config") -> Any:
    """`data` with `${VAR}` / `${VAR:-default}` filled in every string value; unset ones: a `ConfigError`.

    >>> substitute_variables({"model": {"batch_size": "${BATCH:-4}", "endpoint": "https://${HOST}/v1"}}, {"HOST": "h"})
    {'model': {'batch_size': '4', 'endpoint': 'https://h/v1'}}
    """
    unset: list[str] = []

    def fill(text: str, key: str) -> str:
        def value(match: re.Match) -> str:
            if match.group(0) == "$${":
                return "${"
            name, default = match.group(1), match.group(2)
            found = environ.get(name)
            if found is None or (found == "" and default is not None):
                if default is None:
                    unset.append(f"{key}: ${{{name}}} is not set in the environment "
                                 f"(set it, or give a default: ${{{name}:-value}})")
                    return ""
                return default
            if is_secret_name(name):
                register_secret(found)
            return found

        return _VARIABLE.sub(value, text)

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {name: walk(value, f"{key}.{name}" if key else str(name)) for name, value in node.items()}
        if isinstance(node, list):
            return [walk(value, key) for value in node]
        return fill(node, key) if isinstance(node, str) else node

    filled = walk(data, "")
    if unset:
        raise ConfigError(f"invalid job config {source}:\n" + "\n".join(f"  {line}" for line in unset))
    return filled


def resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`data` with its relative local paths made absolute against `folder` (the module docstring's keys).

    >>> resolve_paths({"input": {"path": "in.parquet"}, "output": {"path": "s3://b/out"},
    ...                "model": {"path": "org/model"}}, Path("/jobs"))
    {'input': {'path': '/jobs/in.parquet'}, 'output': {'path': 's3://b/out'}, 'model': {'path': 'org/model'}}
    """
    data = {name: dict(section) if isinstance(section, dict) else section for name, section in data.items()}
    for section, key in (("input", "path"), ("output", "path"), ("model", "state_url")):
        _update(data, section, key, lambda value: _local_path(value, folder))
    for section in ("input", "output"):
        catalog = data.get(section, {}).get("catalog") if isinstance(data.get(section), dict) else None
        if isinstance(catalog, dict):
            catalog = data[section]["catalog"] = dict(catalog)
            if isinstance(catalog.get("uri"), str) and catalog["uri"].startswith(_SQLITE):
                database = catalog["uri"][len(_SQLITE):]
                catalog["uri"] = _SQLITE + _local_path(database, folder) if database else catalog["uri"]
            if isinstance(catalog.get("warehouse"), str):
                catalog["warehouse"] = _local_path(catalog["warehouse"], folder)
    for key in ("path", "transformer_path"):
        _update(data, "model", key, lambda value: _checkpoint(value, folder))
    return data


def _update(data: dict[str, Any], section: str, key: str, resolve) -> None:
    values = data.get(section)
    if not isinstance(values, dict) or key not in values:
        return
    value = values[key]
    if isinstance(value, str):
        values[key] = resolve(value)
    elif isinstance(value, dict):  # model.path per task
        values[key] = {task: resolve(one) if isinstance(one, str) else one for task, one in value.items()}


def _local_path(value: str, folder: Path) -> str:
    """`value` joined to `folder` when it is a relative local path (a trailing / kept); URLs and the rest as given."""
    if not value or "://" in value or os.path.isabs(value) or value.startswith("~"):
        return value
    joined = os.path.normpath(os.path.join(folder, value))
    return joined + "/" if value.endswith("/") else joined


def _checkpoint(value: str, folder: Path) -> str:
    """A checkpoint folder next to the YAML, made absolute; a hub id (`org/name`) as given."""
    explicit = value.startswith(("./", "../")) or value in (".", "..")
    return _local_path(value, folder) if explicit or (folder / value).exists() else value
