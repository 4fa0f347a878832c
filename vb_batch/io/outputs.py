"""Reading a vb_batch output back: open it (any format, committed rows only) and see what its columns mean.

`open_output` takes a path (a Parquet dataset, a Delta table, an Iceberg
table's location; the format is detected) or an `OutputConfig`;
`OutputView` reads the schema metadata (which column holds depth, normals,
masks, the id, the image). The report, the readers and `load_arrays` all
start here; writing lives in `vb_batch.io.sinks` and the lake modules.

An output's stored job config is data, not instructions: input pictures
given by URI are fetched under `OutputView.uri_rules`, which the stored
config may narrow but never widen beyond the defaults.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from vb_batch.config import InputConfig, OutputConfig, StorageOptions
from vb_batch.io.encodings import ColumnMeta, decode_map
from vb_batch.io.fetch import read_uri
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem, split_scheme
from vb_batch.io.formats import detect_format
from vb_batch.io.images import decode_image
from vb_batch.io.sinks import META_DIR, commit_records, marker_schema, replay
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
        from vb_batch.io.delta import open_delta

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
    records = commit_records(fs, meta)
    schema = marker_schema(fs, meta)
    if records or schema is not None:
        # Only the files vb_batch committed (not whatever else lies in the folder), and of a commit in
        # flight (record written, files still moving) only those already in place.
        present = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
        files = [posixpath.join(root, name) for name in replay(records) if name in present]
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


def _read_column(source: Any, column: str) -> tuple[pa.ChunkedArray, pa.Field]:
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        table = source if isinstance(source, pa.Table) else pa.Table.from_batches([source])
    else:
        table = read_output(source if isinstance(source, OutputConfig) else str(source), columns=[column])
    if column not in table.column_names:
        raise KeyError(f"column {column!r} not in the table; columns: {table.column_names}")
    return table.column(column), table.schema.field(column)


def load_arrays(table_or_path: Any, column: str) -> list[np.ndarray | None]:
    """Decode a vb_batch output column back into numpy arrays in real units, one per row.

    `table_or_path`: an Arrow table read from an output; the path of a
    Parquet output, a Delta table or an Iceberg table's location; or an
    `OutputConfig` (how an Iceberg table is named in its catalog).

    Depth comes back as float32 metres (or relative units, see the field's
    ``vb.unit``) with NaN = invalid and +inf = far; normals as float32 unit
    vectors (H, W, 3) in the frame named by ``vb.frame``; class ids and masks
    as integers. Rows that failed (null cells) give ``None``.

    >>> import vb_batch
    >>> depths = vb_batch.load_arrays("out/", "depth")     # doctest: +SKIP
    >>> depths[0].shape, depths[0].dtype                   # doctest: +SKIP
    ((480, 640), dtype('float32'))
    >>> from vb_batch.config import OutputConfig
    >>> lake = OutputConfig(format="iceberg", table="labels.images",
    ...                     catalog={"type": "sql", "uri": "sqlite:///lake.db", "warehouse": "file:///lake"})
    >>> normals = vb_batch.load_arrays(lake, "normals")    # doctest: +SKIP
    """
    values, fld = _read_column(table_or_path, column)
    meta = ColumnMeta.from_metadata(fld.metadata)
    return [None if cell is None else decode_map(cell, meta) for cell in values.to_pylist()]


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
        self.maps = {
            f.name: ColumnMeta.from_metadata(f.metadata)
            for f in self.schema
            if f.metadata and b"vb.kind" in f.metadata
        }

    def column_of(self, kind: str) -> str | None:
        """The first prediction column of `kind` (ground-truth columns carry vb.role = truth)."""
        return next((n for n, m in self.maps.items() if m.kind == kind and m.extra.get("role") != "truth"), None)

    def read(self, columns: list[str], filter=None, limit: int | None = None) -> pa.Table:
        columns = [c for c in columns if c in self.schema.names]
        scanner = self.dataset.scanner(columns=columns, filter=filter)
        return scanner.head(limit) if limit is not None else scanner.to_table()

    def uri_rules(self, allowed_prefixes: list[str] | None = None, allow_private_addresses: bool = False) -> InputConfig:
        """Where this output's URI inputs may be fetched from when it is read back (report, show, readers).

        The stored job config is data written by whoever wrote the output, not an instruction:
        it may narrow the default rules (its `allowed_prefixes`, when all of them lie in the
        stored input's own scheme, the default) but never widen them. Its
        `allow_private_addresses`, its storage endpoint and its size limits are ignored. The
        arguments are the caller's own word (the command line's `--allow-uri-prefix`,
        `--allow-private-addresses`): they replace the stored prefixes and may widen.
        """
        stored = self.job.get("input") if isinstance(self.job, dict) else None
        stored = stored if isinstance(stored, dict) else {}
        path = stored.get("path") if isinstance(stored.get("path"), str) and stored.get("path") else self.path
        if allowed_prefixes is None:
            kept = stored.get("allowed_prefixes")
            scheme = split_scheme(path)[0]
            narrower = (
                isinstance(kept, list) and kept
                and all(isinstance(p, str) and p and split_scheme(p)[0] == scheme for p in kept)
            )
            allowed_prefixes = list(kept) if narrower else None
        return InputConfig(
            path=path, allowed_prefixes=allowed_prefixes, allow_private_addresses=allow_private_addresses,
            storage=self.storage or StorageOptions(),
        )

    def input_image(self, row: dict[str, Any], rules: InputConfig | None = None) -> np.ndarray | None:
        """The row's input image as RGB, from kept bytes or its URI; None if unavailable.

        `rules`: the URI fetch rules and size limits to apply (the live job's `cfg.input` when
        vb_batch reports its own run); None: `uri_rules()`, the stored config never wider than
        the defaults.
        """
        rules = rules or self.uri_rules()
        uri = row.get(self.uri_column) if self.uri_column else None
        try:
            if self.image_column and row.get(self.image_column) is not None:
                cell = row[self.image_column]
                data = cell.get("bytes") if isinstance(cell, dict) else cell
            elif isinstance(uri, str) and uri:
                data = read_uri(uri, rules)
            else:
                return None
            if not isinstance(data, bytes):
                return None
            return decode_image(data, rules.max_pixels, formats=rules.image_formats, max_bytes=rules.max_bytes)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report
            # The URI's query string may be a signature: masked like every URL that is shown.
            shown = scrub(str(exc), url_secrets(uri)) if isinstance(uri, str) else str(exc)
            log.warning("no input image for row %s: %s", row.get(self.id_column), shown)
            return None
