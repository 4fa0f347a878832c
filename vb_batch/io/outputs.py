"""Reading a vb_batch output back: open it (any format, committed rows only) and see what its columns mean.

`open_output` takes a path (a Parquet dataset, a Delta table, an Iceberg
table's location; the format is detected) or an `OutputConfig`;
`OutputView` reads the schema metadata (which column holds depth, normals,
masks, the id, the image). The report, the readers and `load_arrays` all
start here; writing lives in `vb_batch.io.sinks` and the lake modules.

An output's files are data, not instructions: its pictures come from the
output itself (stored image bytes, maps); input pictures given by URI are
fetched only under rules the viewer names (`OutputView.uri_rules`), never
under anything the output's cells or stored config say.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from vb_batch.config import InputConfig, OutputConfig, StorageOptions
from vb_batch.io.encodings import ColumnMeta, decode_map
from vb_batch.io.fetch import read_uri
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem
from vb_batch.io.formats import detect_format
from vb_batch.io.images import decode_image
from vb_batch.io.sinks import META_DIR, commit_records, marker_schema, visible_files
from vb_batch.masking import scrub, url_secrets

log = logging.getLogger(__name__)


@dataclass
class Output:
    """A vb_batch output of any format as a pyarrow dataset; its schema carries the `vb.*` metadata."""

    dataset: pads.Dataset
    location: str  # URL of the dataset or table root: where `_vb/` and the report live
    format: str
    storage: StorageOptions | None = None


def open_output(output: str | OutputConfig, storage: StorageOptions | None = None) -> Output:
    """Open an output by path (a Parquet dataset, a Delta table, an Iceberg table's location) or by its config.

    Only committed rows are seen: a Parquet dataset's visible part files, a
    lake table's current version.
    """
    if isinstance(output, OutputConfig):
        storage = storage or output.storage
        fmt, path = output.format, output.path
    else:
        path = str(output)
        if not path:
            raise ValueError("open_output: no path; give an output's path, or its OutputConfig for an Iceberg table")
        fmt = detect_format(path, storage)
    if fmt == "delta":
        from vb_batch.io.tables.delta import open_delta

        return Output(open_delta(path, storage), path, fmt, storage)
    if fmt == "iceberg":
        from vb_batch.io import iceberg

        if isinstance(output, OutputConfig):
            table = iceberg.iceberg_table(iceberg.iceberg_catalog(output.catalog, storage), output.table)
            if table is None:
                raise FileNotFoundError(f"output.table {output.table!r}: no such Iceberg table")
        else:
            table = iceberg.open_iceberg_path(path, storage)
        return Output(iceberg.open_iceberg(table, storage), iceberg.iceberg_location(table), fmt, storage)
    fs, root = fsspec_filesystem(path, storage)
    arrow_fs, _ = arrow_filesystem(path, storage)
    meta = posixpath.join(root, META_DIR)
    # Listed before the records are read: a commit whose record appears after the listing counts as in flight.
    try:
        present = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        present = set()
    records = commit_records(fs, meta)
    schema = marker_schema(fs, meta)
    if records or schema is not None:
        # Only the files vb_batch committed (not whatever else lies in the folder). The newest commits are in
        # flight until their files are all in place (record written, files still moving): the output as it
        # was before them, so a commit that also removes files (compaction, retry_failed) never shows half.
        while records and (records[-1][1] is None or not set(records[-1][1].get("files", [])) <= present):
            records = records[:-1]
        files = [posixpath.join(root, name) for name in visible_files(records) if name in present]
        # No committed rows yet: the columns the marker records, so that selecting them still works.
        dataset = pads.dataset(files, format="parquet", filesystem=arrow_fs, schema=None if files else schema)
    else:  # not a vb_batch output (or one of an early version): every Parquet file in the folder
        dataset = pads.dataset(root, format="parquet", filesystem=arrow_fs, ignore_prefixes=[".", "_"])
    return Output(dataset, path, "parquet", storage)


def output_location(cfg: OutputConfig) -> str:
    """Where an output lives (its `_vb/` run records, `_report.html`): `output.path`, or an Iceberg table's location."""
    if cfg.format != "iceberg":
        return cfg.path
    from vb_batch.io import iceberg

    table = iceberg.iceberg_table(iceberg.iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
    if table is None:
        raise FileNotFoundError(f"output.table {cfg.table!r}: no such Iceberg table")
    return iceberg.iceberg_location(table)


def read_output(
    output: str | OutputConfig, columns: list[str] | None = None, storage: StorageOptions | None = None
) -> pa.Table:
    """Read a vb_batch output (committed rows only, any format), keeping field metadata."""
    return open_output(output, storage).dataset.to_table(columns=columns)


# ---------------------------------------------------------------------------- maps back to numpy

# Where Spark keeps a DataFrame's schema, column metadata included, in the Parquet files it writes
# (its Arrow readers keep no field metadata: `vb_batch.spark.annotate` puts the meanings there).
SPARK_ROW_METADATA = b"org.apache.spark.sql.parquet.row.metadata"

NO_MEANING_HINT = (
    "DuckDB, Polars and pandas results drop Arrow field metadata: pass meta_from= the output it came from "
    "(its path or OutputConfig), or read the output itself"
)


def field_meanings(schema: pa.Schema) -> dict[str, dict[bytes, bytes]]:
    """{column: its `vb.*` metadata} from the fields' own metadata, else from Spark's column metadata."""
    meanings = {}
    raw = (schema.metadata or {}).get(SPARK_ROW_METADATA)
    if raw:
        try:
            spark_fields = json.loads(raw).get("fields", [])
        except (ValueError, AttributeError):  # not Spark's schema JSON: nothing to learn from it
            spark_fields = []
        for f in spark_fields:
            meta = f.get("metadata") if isinstance(f, dict) else None
            if isinstance(meta, dict):
                vb = {k.encode(): str(v).encode() for k, v in meta.items() if k.startswith("vb.")}
                if vb:
                    meanings[f.get("name")] = vb
    for f in schema:
        vb = {k: v for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
        if vb:
            meanings[f.name] = vb
    return meanings


def column_meaning(meaning: Any) -> ColumnMeta:
    """What a map column's cells mean, from a `ColumnMeta`, an Arrow field, or a metadata mapping.

    A mapping may have bytes or str keys, e.g. a Spark column's metadata, `df.schema["depth"].metadata`.
    """
    if isinstance(meaning, ColumnMeta):
        return meaning
    if isinstance(meaning, pa.Field):
        meaning = meaning.metadata
    if meaning is not None and not isinstance(meaning, Mapping):
        raise TypeError(f"a column's meaning is a ColumnMeta, an Arrow field or its metadata, not {type(meaning).__name__}")
    raw = {(k if isinstance(k, bytes) else str(k).encode()): (v if isinstance(v, bytes) else str(v).encode())
           for k, v in (meaning or {}).items()}
    return ColumnMeta.from_metadata(raw)


def decode_cell(cell: Any, meaning: Any) -> np.ndarray | None:
    """One stored map cell -> numpy in real units; None for a failed row's null cell.

    `cell`: PNG bytes or an array struct as any reader gives it (a dict from pyarrow, DuckDB or
    Polars, a Spark `Row`, a pyarrow scalar). `meaning`: a `ColumnMeta`, an Arrow field, or the
    column's metadata (Arrow's, or Spark's `df.schema[name].metadata`).

    >>> import numpy as np, pyarrow as pa, vb_batch
    >>> from vb_batch.io.encodings import ColumnMeta, encode_map
    >>> meta = ColumnMeta(kind="depth", encoding="png", unit="m", task="depth", scale=256.0, offset=0.0)
    >>> cell = encode_map(np.array([[1.5, np.inf]], np.float32), meta)         # what a depth cell holds
    >>> vb_batch.decode_cell(cell, pa.field("depth", pa.binary(), metadata=meta.to_metadata()))
    array([[1.5, inf]], dtype=float32)
    """
    if isinstance(cell, pa.Scalar):
        cell = cell.as_py()
    if cell is None:
        return None
    if hasattr(cell, "asDict"):  # a Spark Row (an array-encoded cell)
        cell = cell.asDict()
    if isinstance(cell, dict) and not isinstance(cell.get("data"), bytes) and cell.get("data") is not None:
        cell = {**cell, "data": bytes(cell["data"])}  # Spark's bytearray, a memoryview
    elif isinstance(cell, (bytearray, memoryview)):
        cell = bytes(cell)
    return decode_map(cell, column_meaning(meaning))


def as_arrow_table(data: Any) -> pa.Table:
    """Any table as Arrow: pyarrow, pandas, Polars, a DuckDB result, a Spark DataFrame (collected)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if hasattr(data, "toArrow") and hasattr(data, "sparkSession"):  # a Spark DataFrame: meanings from its schema
        table = data.toArrow()
        meanings = {f.name: f.metadata for f in data.schema.fields if f.metadata and "vb.kind" in f.metadata}
        fields = [f.with_metadata(column_meaning(meanings[f.name]).to_metadata()) if f.name in meanings else f
                  for f in table.schema]
        return table.cast(pa.schema(fields, metadata=table.schema.metadata))
    try:
        table = pa.table(data)  # pandas, and anything with an Arrow stream (Polars, DuckDB relations)
    except (TypeError, ValueError, pa.ArrowInvalid) as exc:
        raise TypeError(f"cannot read {type(data).__name__} as an Arrow table ({exc}); give a pyarrow Table, a "
                        "pandas or Polars DataFrame, a DuckDB result, or an output's path") from None
    plain = pa.schema([f.with_type(_without_views(f.type)) for f in table.schema], metadata=table.schema.metadata)
    return table if plain == table.schema else table.cast(plain)


def _without_views(typ: pa.DataType) -> pa.DataType:
    """Polars hands strings and bytes over as views, which pyarrow's filters cannot compare yet."""
    if pa.types.is_string_view(typ):
        return pa.large_string()
    if pa.types.is_binary_view(typ):
        return pa.large_binary()
    if pa.types.is_struct(typ):
        return pa.struct([f.with_type(_without_views(f.type)) for f in typ])
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_list_view(typ):
        return pa.large_list(typ.value_field.with_type(_without_views(typ.value_type)))
    return typ


def _id_column(schema: pa.Schema, given: str | None) -> str:
    if given:
        return given
    job = json.loads((schema.metadata or {}).get(b"vb.job", b"{}") or b"{}")
    stored = job.get("input", {}).get("id_column") if isinstance(job, dict) else None
    return stored if isinstance(stored, str) else "id"


def _selection(schema: pa.Schema, ids: Any, filter: str | None, id_column: str) -> pc.Expression | None:
    """The rows `ids` and `filter` (pyiceberg's row-filter syntax, as `input.filter`) select, as one expression."""
    from vb_batch.io.filters import filter_expression

    selection = None if filter is None else filter_expression(filter, schema, field="filter")
    if ids is not None:
        if id_column not in schema.names:
            raise KeyError(f"ids=: no id column {id_column!r} in the table; pass id_column=, columns: {schema.names}")
        try:
            wanted = pa.array(list(ids), schema.field(id_column).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeError(f"ids=: give ids of the id column {id_column!r}'s type, "
                            f"{schema.field(id_column).type}: {exc}") from None
        chosen = pc.field(id_column).isin(wanted)
        selection = chosen if selection is None else selection & chosen
    return selection


def load_arrays(
    table_or_path: Any,
    column: str,
    *,
    ids: Any = None,
    filter: str | None = None,
    meta_from: Any = None,
    id_column: str | None = None,
    storage: StorageOptions | None = None,
) -> list[np.ndarray | None]:
    """Decode a vb_batch map column back into numpy arrays in real units, one per row.

    `table_or_path`: the path of a Parquet output, a Delta table or an Iceberg table's location,
    or an `OutputConfig` (an Iceberg table by its catalog name); a folder Spark wrote from a
    `vb_batch.spark.annotate` DataFrame; or any table: pyarrow, pandas, Polars, a DuckDB result.

    What the cells mean (unit, scale, frame, legend) comes from the table's field metadata, else
    from Spark's column metadata in the Parquet files it wrote, else from `meta_from`: the output
    the rows came from (path, `OutputConfig`, Arrow schema or table), needed for query results of
    DuckDB, Polars and pandas, which drop field metadata.

    `ids`: only these rows, returned in the order given (a missing id is a `KeyError`); the id
    column is the output's `input.id_column` (or `id_column=`). `filter`: only the rows it selects,
    in the row-filter syntax of `input.filter` ("camera = 'a' and depth_median_m < 5"); with
    both, the given ids that pass the filter, in the order given.

    Depth comes back as float32 metres (or relative units, see the field's ``vb.unit``) with NaN =
    invalid and +inf = far; normals as float32 unit vectors (H, W, 3) in the frame named by
    ``vb.frame``; class ids and masks as integers. Rows that failed (null cells) give ``None``.

    >>> import vb_batch
    >>> depths = vb_batch.load_arrays("out/", "depth")                          # doctest: +SKIP
    >>> depths[0].shape, depths[0].dtype                                        # doctest: +SKIP
    ((480, 640), dtype('float32'))
    >>> near = vb_batch.load_arrays("out/", "depth", filter="depth_median_m < 3")  # doctest: +SKIP
    >>> two = vb_batch.load_arrays("out/", "normals", ids=["img-7", "img-2"])  # doctest: +SKIP
    >>> import duckdb
    >>> rows = duckdb.sql("select id, depth from 'out/*.parquet' where depth_max_m > 50")  # doctest: +SKIP
    >>> far = vb_batch.load_arrays(rows, "depth", meta_from="out/")              # doctest: +SKIP
    >>> from vb_batch.config import OutputConfig
    >>> lake = OutputConfig(format="iceberg", table="labels.images",
    ...                     catalog={"type": "sql", "uri": "sqlite:///lake.db", "warehouse": "file:///lake"})
    >>> normals = vb_batch.load_arrays(lake, "normals")    # doctest: +SKIP
    """
    if isinstance(table_or_path, (str, PathLike, OutputConfig)):
        dataset = open_output(table_or_path if isinstance(table_or_path, OutputConfig) else str(table_or_path),
                              storage).dataset
        schema = dataset.schema
        where = f"output {table_or_path if not isinstance(table_or_path, OutputConfig) else table_or_path.path!r}"
    else:
        dataset, schema, where = None, None, "the table"
        table = as_arrow_table(table_or_path)
        schema = table.schema
    if column not in schema.names:
        raise KeyError(f"column {column!r} not in {where}; columns: {schema.names}")
    meta = _meaning_of(schema, column, meta_from, storage)
    id_col = _id_column(schema, id_column)
    selection = _selection(schema, ids, filter, id_col)
    wanted = [column] + ([id_col] if id_col in schema.names and id_col != column else [])
    if dataset is not None:
        table = dataset.to_table(columns=wanted, filter=selection)
    else:
        table = table.select(wanted)
        if selection is not None:
            table = table.filter(selection)
    cells = table.column(column).to_pylist()
    row_ids = table.column(id_col).to_pylist() if id_col in table.column_names else list(range(len(cells)))
    arrays = []
    for row_id, cell in zip(row_ids, cells):
        try:
            arrays.append(decode_cell(cell, meta))
        except Exception as exc:
            raise ValueError(f"column {column!r}, row {row_id!r}: cannot decode the cell as {meta.kind} "
                             f"({meta.encoding}): {type(exc).__name__}: {exc}") from exc
    if ids is None:
        return arrays
    by_id = {}
    for row_id, values in zip(row_ids, arrays):
        by_id.setdefault(row_id, values)
    missing = [i for i in ids if i not in by_id]
    if missing and filter is None:
        raise KeyError(f"ids=: {len(missing)} id(s) not in {where} (column {id_col!r}), e.g. {missing[:5]}")
    return [by_id[i] for i in ids if i in by_id]


def meanings_from(meta_from: Any, storage: StorageOptions | None = None) -> tuple[dict[str, dict[bytes, bytes]], str]:
    """(`field_meanings`, where they came from) of `meta_from`: an output (path, `OutputConfig`), a schema, a table."""
    if isinstance(meta_from, (str, PathLike, OutputConfig)):
        source = open_output(meta_from if isinstance(meta_from, OutputConfig) else str(meta_from), storage)
        return field_meanings(source.dataset.schema), f"meta_from={source.location!r}"
    schema = meta_from if isinstance(meta_from, pa.Schema) else as_arrow_table(meta_from).schema
    return field_meanings(schema), "meta_from"


def _meaning_of(schema: pa.Schema, column: str, meta_from: Any, storage: StorageOptions | None) -> ColumnMeta:
    """The `ColumnMeta` of `column`: from `meta_from` when given, else from the table (fields or Spark's)."""
    if isinstance(meta_from, (ColumnMeta, pa.Field, Mapping)):
        return column_meaning(meta_from)
    if meta_from is not None:
        meanings, origin = meanings_from(meta_from, storage)
        if b"vb.kind" not in meanings.get(column, {}):
            maps = [n for n, m in meanings.items() if b"vb.kind" in m]
            raise ValueError(f"column {column!r}: {origin} has no such vb_batch map column; its maps: {maps}")
        return column_meaning(meanings[column])
    meaning = field_meanings(schema).get(column)
    if not meaning or b"vb.kind" not in meaning:
        raise ValueError(f"column {column!r}: the table does not say what its cells mean (no vb.* field metadata, "
                         f"no Spark column metadata); {NO_MEANING_HINT}")
    return column_meaning(meaning)


class OutputView:
    """A vb_batch output seen through its schema metadata: which columns hold what.

    `path`: a Parquet output, a Delta table or an Iceberg table's location, or
    an `OutputConfig` (an Iceberg table by name); `self.path` is where the
    output lives (its `_vb/` run records, the report).
    """

    def __init__(self, path: str | OutputConfig, storage: StorageOptions | None = None):
        output = open_output(path, storage)
        self.path = output.location
        self.storage = output.storage
        self.dataset = output.dataset
        self.schema = self.dataset.schema
        meta = self.schema.metadata or {}
        self.job = json.loads(meta.get(b"vb.job", b"{}"))
        self.image_column = meta.get(b"vb.image_column", b"").decode() or None
        self.uri_column = meta.get(b"vb.uri_column", b"").decode() or None
        self.id_column = self.job.get("input", {}).get("id_column", "id")
        # Field metadata, or Spark's column metadata in a folder Spark wrote from `vb_batch.spark.annotate`.
        self.maps = {
            name: ColumnMeta.from_metadata(meta)
            for name, meta in field_meanings(self.schema).items()
            if b"vb.kind" in meta and name in self.schema.names
        }

    def column_of(self, kind: str) -> str | None:
        """The first prediction column of `kind` (ground-truth columns carry vb.role = truth)."""
        return next((n for n, m in self.maps.items() if m.kind == kind and m.extra.get("role") != "truth"), None)

    def read(self, columns: list[str], filter=None, limit: int | None = None) -> pa.Table:
        columns = [c for c in columns if c in self.schema.names]
        scanner = self.dataset.scanner(columns=columns, filter=filter)
        return scanner.head(limit) if limit is not None else scanner.to_table()

    def uri_rules(self, allowed_prefixes: list[str] | None = None, allow_private_addresses: bool = False
                  ) -> InputConfig | None:
        """The viewer's rules for fetching this output's URI inputs when it is read back; None: fetch none.

        An output's files are data written by whoever wrote it: its URI cells may name any file of
        the viewer's, and its stored job config may say anything. So nothing of either widens or
        chooses what is read: URI inputs are fetched only when the viewer names `allowed_prefixes`
        (the command line's `--allow-uri-prefix`), only under them, with the default size limits and
        formats, no loopback, private or link-local http hosts unless `allow_private_addresses`
        (`--allow-private-addresses`), and this view's own storage options.
        """
        if not allowed_prefixes:
            return None
        return InputConfig(
            path=allowed_prefixes[0], allowed_prefixes=list(allowed_prefixes),
            allow_private_addresses=allow_private_addresses, storage=self.storage or StorageOptions(),
        )

    def stored_image(self, row: dict[str, Any], rules: InputConfig | None = None) -> np.ndarray | None:
        """The row's input image as RGB from the bytes the output itself keeps; None if it keeps none.

        Decoded under `rules`' size limits and formats (None: the defaults).
        """
        rules = rules or InputConfig(path=self.path)
        cell = row.get(self.image_column) if self.image_column else None
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes):
            return None
        try:
            return decode_image(data, rules.max_pixels, formats=rules.image_formats, max_bytes=rules.max_bytes)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report
            log.warning("no input image for row %s: %s", row.get(self.id_column), exc)
            return None

    def input_image(self, row: dict[str, Any], rules: InputConfig | None = None) -> np.ndarray | None:
        """The row's input image as RGB: the kept bytes, else (with `rules` only) fetched from its URI; None if unavailable.

        `rules`: where URI inputs may be fetched from: the live job's `cfg.input` when vb_batch
        reports its own run, or the viewer's `uri_rules(...)`. None: no URI is read, only the
        output's own bytes (see `uri_rules`).
        """
        image = self.stored_image(row, rules)
        uri = row.get(self.uri_column) if self.uri_column else None
        if image is not None or rules is None or not isinstance(uri, str) or not uri:
            return image
        try:
            data = read_uri(uri, rules)
            return decode_image(data, rules.max_pixels, formats=rules.image_formats, max_bytes=rules.max_bytes)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report
            # The URI's query string may be a signature: masked like every URL that is shown.
            log.warning("no input image for row %s: %s", row.get(self.id_column), scrub(str(exc), url_secrets(uri)))
            return None
