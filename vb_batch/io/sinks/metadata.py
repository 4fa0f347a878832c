"""Metadata files of an output: written whole or not at all, read without trusting them; the job fingerprint.

Every metadata file under `_vb/` (the marker `output.json`, commit records,
intents, run records) and `_SUCCESS` is written with `write_atomic`: local
files as a temporary file, fsync, rename (and fsync of the folder); object
stores as one PUT. `read_json` reads one back and returns None, with a
warning, when it is missing, empty or damaged: a record that cannot be read
was never acted on.

The job fingerprint (columns, their `vb.*` meanings, model, profile) says
whether the rows of two runs may share one output; the marker records it, and
the schema (so that an output without rows yet reads with its columns).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
from fsspec.implementations.local import LocalFileSystem

from vb_batch._version import __version__
from vb_batch.io.lease import write_temp_file

log = logging.getLogger(__name__)

META_DIR = "_vb"
MARKER = "output.json"
# `_vb/latest-run.json` names the latest run's record under `_vb/runs/` (Iceberg: the `vb.last-run` property).
LATEST_RUN = "latest-run.json"
# What vb_batch itself keeps at the top of an output, besides data files and `_vb/`.
OWN_FILES = frozenset({"_SUCCESS", "_report.html", "_metrics.parquet"})


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write `path` whole or not at all: a crash or a full disk never leaves a partial file."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: object stores show the whole object or none
        return
    temp = write_temp_file(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(posixpath.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def read_json(fs, path: str) -> dict[str, Any] | None:
    """A metadata record, or None (with a warning) when it is missing, empty or damaged."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
        record = json.loads(data)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        log.warning("ignoring damaged record %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


def schema_fingerprint(schema: pa.Schema, model: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """What must stay the same for rows of two runs to live in one output: columns, their meanings, the model."""
    meanings = {}
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
        if meta:
            meanings[f.name] = meta
    return {"columns": {f.name: str(_plain_type(f.type)) for f in schema}, "meanings": meanings, "model": model,
            "profile": profile}


def data_fingerprint(dataset: pads.Dataset) -> dict[str, Any]:
    """The fingerprint of rows already written, for an output without its marker (written by an earlier
    vb_batch version, or the marker was lost): the columns and meanings of its schema, and the model
    and profile that its first row names (`vb_model`, `vb_profile`)."""
    names = [name for name in ("vb_model", "vb_profile") if name in dataset.schema.names]
    rows = dataset.head(1, columns=names).to_pylist() if names else []
    first = rows[0] if rows else {}
    return schema_fingerprint(dataset.schema, first.get("vb_model"), first.get("vb_profile"))


def _plain_type(typ: pa.DataType) -> pa.DataType:
    """`typ` as vb_batch writes it, whatever a storage format made of it on the way back.

    A fingerprint read back from data (an output without its marker: Parquet files name list
    items "element", Iceberg returns large strings and binaries) must equal the job's own.
    """
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return pa.string()
    if pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ):
        return pa.binary()
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return pa.list_(typ.value_field.with_type(_plain_type(typ.value_type)).with_name("item"))
    if pa.types.is_struct(typ):
        return pa.struct([f.with_type(_plain_type(f.type)) for f in typ])
    return typ


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between an output's fingerprint and a job's, in words (empty: compatible)."""
    changes = []
    old_cols, new_cols = old.get("columns", {}), new.get("columns", {})
    if sorted(set(new_cols) - set(old_cols)):
        changes.append(f"columns only in this job: {sorted(set(new_cols) - set(old_cols))}")
    if sorted(set(old_cols) - set(new_cols)):
        changes.append(f"columns only in the output: {sorted(set(old_cols) - set(new_cols))}")
    for name in sorted(set(old_cols) & set(new_cols)):
        if old_cols[name] != new_cols[name]:
            changes.append(f"column {name!r}: type {old_cols[name]} in the output, {new_cols[name]} in this job")
        before, after = old.get("meanings", {}).get(name, {}), new.get("meanings", {}).get(name, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"column {name!r}: {key} {before.get(key)!r} in the output, {after.get(key)!r} in this job")
    for key in ("model", "profile"):
        if old.get(key) and new.get(key) and old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} in the output, {new[key]!r} in this job")
    return changes


def marker_record(fmt: str, fingerprint: dict[str, Any], run_id: str, schema: pa.Schema) -> bytes:
    """The marker `_vb/output.json`: what the output is (format, job fingerprint), and its schema (Arrow
    IPC, base64) so that readers of an output without rows yet still get its columns (`marker_schema`)."""
    record = {"vb_batch": __version__, "format": fmt, "fingerprint": fingerprint, "run_id": run_id,
              "time": time.time(), "schema": base64.b64encode(schema.serialize().to_pybytes()).decode()}
    return json.dumps(record, indent=2).encode()


def marker_schema(fs, meta: str) -> pa.Schema | None:
    """The output schema an output's marker records (None for outputs of earlier versions)."""
    marker = read_json(fs, posixpath.join(meta, MARKER))
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(marker["schema"])))
    except (TypeError, KeyError, ValueError, pa.ArrowInvalid):
        return None
