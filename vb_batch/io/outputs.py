"""Reading a vb_batch output back: open it (any format, committed rows only) and see what its columns mean.

`open_output` takes a path (a Parquet dataset, a Delta table, an Iceberg
table's location; the format is detected) or an `OutputConfig`;
`OutputView` reads the schema metadata (which column holds depth, normals,
masks, the id, the image). The report, the readers and `load_arrays` all
start here; writing lives in `vb_batch.io.sinks` and the lake modules.
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
from vb_batch.io.encodings import ColumnMeta
from vb_batch.io.fetch import read_uri
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem
from vb_batch.io.images import decode_image

log = logging.getLogger(__name__)


@dataclass
class Output:
    """A vb_batch output of any format as a pyarrow dataset; its schema carries the `vb.*` metadata."""

    dataset: pads.Dataset
    location: str  # URL of the dataset or table root: where `_vb/` and the report live
    format: str
    storage: StorageOptions | None = None


def output_format(path: str, storage: StorageOptions | None = None) -> str:
    """"delta", "iceberg" or "parquet": what the output at `path` is (a Delta log, Iceberg metadata, neither)."""
    fs, root = fsspec_filesystem(path, storage)
    if fs.exists(posixpath.join(root, "_delta_log")):
        return "delta"
    if fs.glob(posixpath.join(root, "metadata", "*.metadata.json")):
        return "iceberg"
    return "parquet"


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
        fmt = output_format(path, storage)
    if fmt == "parquet":
        fs, root = arrow_filesystem(path, storage)
        dataset = pads.dataset(root, format="parquet", filesystem=fs, ignore_prefixes=[".", "_"])
        return Output(dataset, path, fmt, storage)
    from vb_batch.io import lake

    if fmt == "delta":
        return Output(lake.open_delta(path, storage), path, fmt, storage)
    if isinstance(output, OutputConfig):
        table = lake.iceberg_table(lake.iceberg_catalog(output.catalog, storage), output.table)
        if table is None:
            raise FileNotFoundError(f"output.table {output.table!r}: no such Iceberg table")
    else:
        table = lake.open_iceberg_path(path, storage)
    return Output(lake.open_iceberg(table, storage), lake.iceberg_location(table), fmt, storage)


def output_location(cfg: OutputConfig) -> str:
    """Where an output lives (its `_vb/` run records, `_report.html`): `output.path`, or an Iceberg table's location."""
    if cfg.format != "iceberg":
        return cfg.path
    from vb_batch.io import lake

    table = lake.iceberg_table(lake.iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
    if table is None:
        raise FileNotFoundError(f"output.table {cfg.table!r}: no such Iceberg table")
    return lake.iceberg_location(table)


def read_output(
    output: str | OutputConfig, columns: list[str] | None = None, storage: StorageOptions | None = None
) -> pa.Table:
    """Read a vb_batch output (committed rows only, any format), keeping field metadata."""
    return open_output(output, storage).dataset.to_table(columns=columns)


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

    def input_image(self, row: dict[str, Any]) -> np.ndarray | None:
        """The row's input image as RGB, from kept bytes or its URI; None if unavailable."""
        try:
            if self.image_column and row.get(self.image_column) is not None:
                cell = row[self.image_column]
                data = cell["bytes"] if isinstance(cell, dict) else cell
            elif self.uri_column and row.get(self.uri_column):
                # The job's own URI rules (allowed prefixes, no internal addresses) apply here too.
                data = read_uri(row[self.uri_column], InputConfig.model_validate(self.job.get("input", {})))
            else:
                return None
            return decode_image(data, max_pixels=10**9)
        except Exception as exc:  # noqa: BLE001 - a missing picture must not stop the report
            log.warning("report: no input image for row %s: %s", row.get(self.id_column), exc)
            return None
