"""Sources: where rows come from. Every source yields Arrow record batches that carry the id column.

* a Parquet file or dataset (local or any fsspec URL) with an image-bytes
  column (plain binary, or Hugging Face's `struct<bytes, path>` image feature)
  or a URI column;
* a folder / prefix of image files: one row per file, `id` = its path
  relative to the folder, `uri` = its full URL.

A row without an id gets a stable one: its URI, or the SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from vb_batch.config import ConfigError, InputConfig
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem, split_scheme

IMAGE_COLUMN_GUESSES = ("image", "image_bytes", "bytes", "img")
URI_COLUMN_GUESSES = ("uri", "url", "path", "image_uri", "image_url", "image_path")


def image_bytes(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The bytes of an image column: plain binary, or the `bytes` field of a `struct<bytes, path>`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return pc.struct_field(column, "bytes")
    return column


def content_id(data: bytes | None) -> str:
    return "sha256:" + hashlib.sha256(data or b"").hexdigest()


@dataclass
class Source:
    """Rows to annotate: a dataset plus which column is the id, the image bytes or the URI."""

    dataset: pads.Dataset
    id_column: str
    image_column: str | None
    uri_column: str | None
    has_id: bool

    @property
    def schema(self) -> pa.Schema:
        """Schema of the batches this source yields (the id column first when it was added)."""
        schema = self.dataset.schema
        return schema if self.has_id else schema.insert(0, pa.field(self.id_column, pa.string()))

    def count_rows(self) -> int:
        return self.dataset.count_rows()

    def with_ids(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.has_id:
            return batch
        if self.uri_column:
            ids = batch.column(self.uri_column).cast(pa.string())
        else:
            ids = pa.array([content_id(b) for b in image_bytes(batch.column(self.image_column)).to_pylist()], pa.string())
        return pa.RecordBatch.from_arrays([ids, *batch.columns], schema=self.schema)

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        for batch in self.dataset.to_batches(batch_size=rows):
            if batch.num_rows:
                yield self.with_ids(batch)


def _image_files_table(cfg: InputConfig) -> pa.Table:
    fs, root = fsspec_filesystem(cfg.path, cfg.storage)
    extensions = tuple(e.lower() for e in cfg.extensions)
    files = sorted(p for p in fs.find(root) if p.lower().endswith(extensions))
    if not files:
        raise ConfigError(f"input.path: no image files ({', '.join(cfg.extensions)}) under {cfg.path!r}")
    scheme, _ = split_scheme(cfg.path)
    prefix = "" if scheme == "file" else f"{scheme}://"
    root = root.rstrip("/") + "/"
    ids = [p[len(root):] if p.startswith(root) else p for p in files]
    return pa.table({cfg.id_column: pa.array(ids, pa.string()), "uri": pa.array([prefix + p for p in files], pa.string())})


def _detect_format(cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fs, path = fsspec_filesystem(cfg.path, cfg.storage)
    if not fs.exists(path):
        raise ConfigError(f"input.path: {cfg.path!r} does not exist")
    if fs.isfile(path):
        return "parquet" if path.endswith((".parquet", ".pq")) else "images"
    has_parquet = any(p.endswith((".parquet", ".pq")) for p in fs.find(path))
    return "parquet" if has_parquet else "images"


def open_source(cfg: InputConfig) -> Source:
    """Open the configured input; configuration faults raise `ConfigError` naming the field."""
    fmt = _detect_format(cfg)
    if fmt == "images":
        table = _image_files_table(cfg)
        return Source(pads.dataset(table), cfg.id_column, None, "uri", has_id=True)

    fs, path = arrow_filesystem(cfg.path, cfg.storage)
    try:
        dataset = pads.dataset(path, format="parquet", filesystem=fs, ignore_prefixes=[".", "_"])
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"input.path: cannot read {cfg.path!r} as Parquet: {exc}") from None
    names = dataset.schema.names
    image_col, uri_col = cfg.image_column, cfg.uri_column
    if not image_col and not uri_col:
        image_col = next((c for c in IMAGE_COLUMN_GUESSES if c in names), None)
        uri_col = None if image_col else next((c for c in URI_COLUMN_GUESSES if c in names), None)
        if not image_col and not uri_col:
            raise ConfigError(
                f"input.image_column: no image or URI column found in {names}; set input.image_column or input.uri_column"
            )
    for key, col in (("input.image_column", image_col), ("input.uri_column", uri_col)):
        if col and col not in names:
            raise ConfigError(f"{key}: column {col!r} not in the input; columns: {names}")
    if image_col:
        typ = dataset.schema.field(image_col).type
        ok = pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or (
            pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0
        )
        if not ok:
            raise ConfigError(f"input.image_column: column {image_col!r} has type {typ}, not binary image bytes")
    return Source(dataset, cfg.id_column, image_col, uri_col, has_id=cfg.id_column in names)
