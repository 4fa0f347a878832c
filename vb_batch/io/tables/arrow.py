"""What Delta and Iceberg tables share when read as Arrow.

Delta keeps Arrow field metadata (`vb.kind`, `vb.unit`, `vb.scale`, `vb.legend`, ...)
in its schema and the job-level keys (`vb.job`, `vb.run_id`, ...) in each commit's
info; Iceberg keeps both as table properties. Readers put them back on the Arrow
schema with `with_metadata`, so a lake output reads with the same schema as a
Parquet one.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from vb_batch.io.filesystems import fsspec_filesystem, is_local

JOB_KEYS = ("vb.version", "vb.run_id", "vb.job", "vb.image_column", "vb.uri_column")


def job_metadata(schema: pa.Schema) -> dict[str, str]:
    """The job-level `vb.*` keys of an output schema, as strings."""
    meta = schema.metadata or {}
    return {k: meta[k.encode()].decode() for k in JOB_KEYS if k.encode() in meta}


def with_metadata(schema: pa.Schema, columns: dict[str, dict[str, str]], job: dict[str, str]) -> pa.Schema:
    """`schema` with field metadata per column and job-level metadata put back (what the formats keep apart)."""
    fields = [f.with_metadata({**(f.metadata or {}), **columns[f.name]}) if f.name in columns else f for f in schema]
    return pa.schema(fields, metadata={**(schema.metadata or {}), **job} or None)


def local_uri(url: str) -> str:
    """An absolute path for a local table (the lake libraries resolve relative paths differently)."""
    return os.path.abspath(fsspec_filesystem(url)[1]) if is_local(url) else url.rstrip("/")


def file_dataset(files: list[tuple[str, pc.Expression | None]], schema: pa.Schema, fs: pafs.FileSystem) -> pads.Dataset:
    """A pyarrow dataset over given Parquet files (path in `fs`, partition expression): a lake table's snapshot."""
    fmt = pads.ParquetFileFormat()
    fragments = [fmt.make_fragment(path, filesystem=fs, partition_expression=expr) for path, expr in files]
    return pads.FileSystemDataset(fragments, schema, fmt, fs)
