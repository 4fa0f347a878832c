"""Table formats: which one a path holds, and the sink of each (a registry, imported lazily).

    parquet   a Parquet file or dataset (sink: `vb_batch.io.sinks.parquet`)
    delta     a Delta Lake table: `_delta_log/` (sink: `vb_batch.io.sinks.delta`, read:
              `vb_batch.io.tables.delta`; needs the `lake` extra)
    iceberg   an Iceberg table: `metadata/*.metadata.json` (sink: `vb_batch.io.sinks.iceberg`,
              read: `vb_batch.io.tables.iceberg`; needs `lake`)
    images    a folder / prefix of image files (an input only)

Sources (`vb_batch.io.sources`) and outputs (`vb_batch.io.outputs`) both ask
`detect_format`, so an input and an output path are recognised the same way.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow as pa

from vb_batch.config import OutputConfig, StorageOptions
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.registry import Registry

PARQUET_SUFFIXES = (".parquet", ".pq")
LAKE_HINT = "pip install 'vb_batch[lake]'"

SINKS: Registry[type] = Registry(
    "output format",
    field="output.format",
    entries={
        "parquet": "vb_batch.io.sinks.parquet:ParquetSink",
        "delta": "vb_batch.io.sinks.delta:DeltaSink",
        "iceberg": "vb_batch.io.sinks.iceberg:IcebergSink",
    },
    hints={"delta": LAKE_HINT, "iceberg": LAKE_HINT},
)


def detect_format(path: str, storage: StorageOptions | None = None) -> str:
    """"delta", "iceberg", "parquet" or "images": what `path` holds; FileNotFoundError when nothing is there."""
    fs, root = fsspec_filesystem(path, storage)
    if not fs.exists(root):
        raise FileNotFoundError(path)
    if fs.exists(posixpath.join(root, "_delta_log")):
        return "delta"
    if fs.glob(posixpath.join(root, "metadata", "*.metadata.json")):
        return "iceberg"
    if fs.isfile(root):
        return "parquet" if root.endswith(PARQUET_SUFFIXES) else "images"
    return "parquet" if any(p.endswith(PARQUET_SUFFIXES) for p in fs.find(root)) else "images"


def open_sink(cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id", **options: Any):
    """The sink for `output.format` (options: `fingerprint`, `retry_failed`; see `vb_batch.io.sinks.base.Sink`)."""
    return SINKS[cfg.format](cfg, run_id, schema, id_column, **options)
