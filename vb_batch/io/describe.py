"""What every column of an output means: `vb_batch.describe(OUTPUT)` and `vb-batch describe OUTPUT`.

DuckDB and Polars show a column's type, never its unit or scale: a depth PNG
is "BLOB", `depth_median_m` a float. The meanings live in field metadata
(or Spark's column metadata); this module puts them in words, one line per
column: type, unit, how stored numbers map to values, and what the column is.

Python: `print(vb_batch.describe("out/"))`; the command line: `vb-batch describe out/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vb_batch.config import OutputConfig, StorageOptions
from vb_batch.io.encodings import PNG_FAR, PNG_INVALID, ColumnMeta
from vb_batch.io.outputs import (
    as_arrow_table,
    field_meanings,
    meanings_from,
    open_output,
)

# The columns every output has besides the task columns (names from vb_batch.pipeline.columns).
FIXED_NOTES = {
    "vb_error": ("", "null when the row succeeded; else {code, message} of what failed"),
    "vb_model": ("", "provenance: the model (id or path, revision)"),
    "vb_profile": ("", "provenance: the model profile (prompts, codec presets)"),
    "vb_run_id": ("", "provenance: the run that wrote the row"),
    "vb_version": ("", "provenance: the vb_batch version"),
}


@dataclass(frozen=True)
class ColumnInfo:
    """One column of an output, in words."""

    column: str
    type: str
    unit: str = ""
    scale: str = ""
    meaning: str = ""


@dataclass(frozen=True)
class Description:
    """Every column of an output; `str()` is the table `vb-batch describe` prints."""

    source: str
    format: str
    rows: int | None
    columns: list[ColumnInfo]

    def __getitem__(self, name: str) -> ColumnInfo:
        return next(c for c in self.columns if c.column == name)

    def __str__(self) -> str:
        head = f"{self.source}: {self.format}" + (f", {self.rows} rows" if self.rows is not None else "")
        lines = [("column", "type", "unit", "scale", "meaning")]
        lines += [(c.column, c.type, c.unit, c.scale, c.meaning) for c in self.columns]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        body = ["  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths)) + "  " + line[4] for line in lines]
        return "\n".join([f"{head}, {len(self.columns)} columns", *(b.rstrip() for b in body)])


def short_type(typ: pa.DataType) -> str:
    """A type as a user reads it: struct and list field names, no nested detail."""
    if pa.types.is_struct(typ):
        return "struct<" + ", ".join(f.name for f in typ) + ">"
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return f"list<{short_type(typ.value_type)}>"
    if pa.types.is_map(typ):
        return f"map<{short_type(typ.key_type)}, {short_type(typ.item_type)}>"
    return str(typ)


def stored_as(meta: ColumnMeta) -> str:
    """How the stored numbers of a map cell give its values."""
    if meta.encoding == "array":
        return "array struct: raw little-endian values (float32 for depth and normals)"
    if meta.kind == "depth":
        return (f"png uint16: value = (stored - {meta.offset:g}) / {meta.scale:g}; "
                f"{PNG_INVALID} = invalid, {PNG_FAR} = far")
    if meta.kind == "normals":
        return "png RGB8: (n + 1) / 2 * 255 in the OpenGL frame; (0, 0, 0) = invalid"
    if meta.kind == "classes":
        return f"png grey: class id; {meta.unlabelled} = unlabelled"
    return "png grey: 1 = object, 0 = elsewhere"


def _map_notes(name: str, meta: ColumnMeta) -> dict[str, ColumnInfo]:
    """The map column and the columns its task adds, by column name."""
    from vb_batch.tasks import TASKS, context_of

    if meta.extra.get("role") == "truth" or meta.task not in TASKS:
        return {name: ColumnInfo(name, "", meta.unit, stored_as(meta), f"ground truth ({meta.kind})")}
    ctx = context_of(meta)
    infos = {}
    for suffix, (unit, meaning) in TASKS[meta.task].column_notes(ctx).items():
        if suffix == "":
            extra = [f"{k} {v}" for k, v in sorted(meta.extra.items()) if k in ("preset", "fractions")]
            if meta.legend:
                extra.append("legend " + ", ".join(n for n, _ in meta.legend))
            meaning = "; ".join([meaning, *extra])
        infos[name + suffix] = ColumnInfo(name + suffix, "", unit, stored_as(meta) if suffix == "" else "", meaning)
    return infos


def describe(
    output: Any, *, meta_from: Any = None, storage: StorageOptions | None = None
) -> Description:
    """Every column of an output (a path, an `OutputConfig`, or any table) with unit, scale and meaning.

    A table from DuckDB, Polars or pandas has lost its meanings: give `meta_from`, the output it
    came from (its columns are then described by that output's metadata).

    >>> import pyarrow as pa, vb_batch
    >>> from vb_batch.io.encodings import ColumnMeta
    >>> depth = ColumnMeta(kind="depth", encoding="png", unit="m", task="depth", scale=256.0, offset=0.0)
    >>> schema = pa.schema([pa.field("id", pa.string()), pa.field("depth", pa.binary(), metadata=depth.to_metadata()),
    ...                     pa.field("depth_median_m", pa.float32())])
    >>> print(vb_batch.describe(schema.empty_table()))
    table: arrow, 0 rows, 3 columns
    column          type    unit  scale                                                             meaning
    id              string                                                                          input column
    depth           binary  m     png uint16: value = (stored - 0) / 256; 0 = invalid, 65535 = far  depth map; NaN = invalid, +inf = far / sky
    depth_median_m  float   m                                                                       median finite depth of the row
    >>> vb_batch.describe(schema.empty_table())["depth_median_m"].unit
    'm'
    >>> print(vb_batch.describe("out/"))                                   # doctest: +SKIP
    """
    rows = None
    if isinstance(output, (str, OutputConfig)) or hasattr(output, "__fspath__"):
        opened = open_output(output if isinstance(output, OutputConfig) else str(output), storage)
        schema, source, fmt = opened.dataset.schema, opened.location, opened.format
        try:
            rows = opened.dataset.count_rows()
        except Exception:  # noqa: BLE001 - a row count is a courtesy: never the reason describe fails
            rows = None
    else:
        table = as_arrow_table(output)
        schema, source, fmt, rows = table.schema, "table", "arrow", table.num_rows
    meanings = field_meanings(schema)
    if meta_from is not None:  # the table's own meanings first; the output it came from for the rest
        meanings = {**meanings_from(meta_from, storage)[0], **meanings}
    notes: dict[str, ColumnInfo] = {}
    for name, meta in meanings.items():
        if b"vb.kind" in meta:
            notes.update(_map_notes(name, ColumnMeta.from_metadata(meta)))
    image_column = (schema.metadata or {}).get(b"vb.image_column", b"").decode()
    uri_column = (schema.metadata or {}).get(b"vb.uri_column", b"").decode()
    described = []
    for f in schema:
        info = notes.get(f.name)
        if info is None:
            unit, meaning = FIXED_NOTES.get(f.name, ("", "input column"))
            if f.name and f.name in (image_column, uri_column):
                meaning = "input image bytes" if f.name == image_column else "input image URI"
            info = ColumnInfo(f.name, "", unit, "", meaning)
        described.append(ColumnInfo(f.name, short_type(f.type), info.unit, info.scale, info.meaning))
    return Description(source=str(source), format=fmt, rows=rows, columns=described)

