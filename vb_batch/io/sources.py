"""Sources: where rows come from. Every source yields Arrow record batches that carry the id column.

* a Parquet file or dataset (local or any fsspec URL) with an image-bytes
  column (plain binary, or Hugging Face's `struct<bytes, path>` image feature)
  or a URI column;
* a folder / prefix of image files: one row per file, `id` = its path
  relative to the folder, `uri` = its full URL;
* a Delta table (`input.path`, its current version) or an Iceberg table
  (`input.table` in `input.catalog`, its current snapshot): their Parquet data
  files, read as a pyarrow dataset (see `vb_batch.io.lake`).

`input.filter` (pyiceberg's row-filter syntax, "day = '2026-11-01' and
camera in ('a', 'b')") keeps matching rows for every format: it prunes
partitions and files (Iceberg: by manifest statistics), row groups by their
statistics, and filters rows.

A row without an id gets a stable one: its URI, or the SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError, InputConfig
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem, split_scheme
from vb_batch.io.filters import filter_expression
from vb_batch.io.formats import detect_format
from vb_batch.timing import timed_items

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


def with_ids(batch: pa.RecordBatch, id_column: str, image_column: str | None, uri_column: str | None) -> pa.RecordBatch:
    """The batch with its id column first when it had none: the URI, or the SHA-256 of the bytes."""
    if id_column in batch.schema.names:
        return batch
    if uri_column:
        ids = batch.column(batch.schema.get_field_index(uri_column)).cast(pa.string())
    else:
        cells = image_bytes(batch.column(batch.schema.get_field_index(image_column))).to_pylist()
        ids = pa.array([content_id(b) for b in cells], pa.string())
    schema = batch.schema.insert(0, pa.field(id_column, pa.string()))
    return pa.RecordBatch.from_arrays([ids, *batch.columns], schema=schema)


@dataclass
class Source:
    """Rows to annotate: a dataset plus which column is the id, the image bytes or the URI."""

    dataset: pads.Dataset
    id_column: str
    image_column: str | None
    uri_column: str | None
    has_id: bool
    filter: pc.Expression | None = None  # rows to keep (`input.filter`)
    location: str = ""  # URL of the filesystem holding the dataset's files ("" or a path: local)
    cfg: InputConfig | None = None  # how to reach the files (storage) and which rows to keep (filter)

    @property
    def schema(self) -> pa.Schema:
        """Schema of the batches this source yields (the id column first when it was added)."""
        schema = self.dataset.schema
        return schema if self.has_id else schema.insert(0, pa.field(self.id_column, pa.string()))

    def count_rows(self) -> int:
        return self.dataset.count_rows(filter=self.filter)

    def with_ids(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return with_ids(batch, self.id_column, self.image_column, self.uri_column)

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """Every row, unit by unit, in batches of at most `rows`: what is held is one batch, not the input.

        The same `read_unit` as the distributed engines' workers, so every
        engine reads exactly the same rows; no reader-side read-ahead (pyarrow's
        `Dataset.to_batches` holds gigabytes ahead of a slow consumer).
        """
        for unit in self.units(rows):
            for batch in read_unit(unit, self.cfg, self.dataset.schema, rows):
                if batch.num_rows:
                    yield self.with_ids(batch)

    def units(self, listing_rows: int = 256, max_rows: int | None = None) -> list[dict[str, Any]]:
        """The input split into independent pieces of work (tasks of a distributed engine).

        A Parquet input (or a lake table's data files) gives one unit per row
        group of each file, minus the partitions, files and row groups that
        `filter` rules out; a row group of more than `max_rows` rows gives
        several units (`offset`, `rows`), so a unit's size is bounded whatever
        the files' row-group size. A folder of images gives slices of its
        listing. Each unit is small and JSON-ready: workers read it with
        `read_unit`, so no image bytes pass the driver.
        """
        if isinstance(self.dataset, pads.FileSystemDataset):
            scheme = split_scheme(self.location)[0] if self.location else "file"
            units = []
            for fragment in self.dataset.get_fragments(filter=self.filter):
                url = fragment.path if scheme in ("file", "local") else f"{scheme}://{fragment.path}"
                # Partition values live in a lake table's log, not in its files: the unit carries them.
                keys = pads.get_partition_keys(fragment.partition_expression)
                partition = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in keys.items()}
                for group in fragment.split_by_row_group(self.filter, schema=self.dataset.schema):
                    info = group.row_groups[0]
                    unit = {"file": url, "row_group": info.id, **({"partition": partition} if partition else {})}
                    if max_rows is None or info.num_rows <= max_rows:
                        units.append(unit)
                        continue
                    for offset in range(0, info.num_rows, max_rows):
                        units.append({**unit, "offset": offset, "rows": min(max_rows, info.num_rows - offset)})
            return units
        listing = self.dataset.to_table(filter=self.filter)
        return [
            {"rows": listing.slice(start, listing_rows).to_pylist()}
            for start in range(0, listing.num_rows, listing_rows)
        ]


# Bytes read ahead per column while streaming a row group: pages arrive as they are decoded, so a
# row group of a million images is read in batches, never held whole.
STREAM_BUFFER_BYTES = 1 << 20


def read_unit(unit: dict[str, Any], cfg: InputConfig | None, schema: pa.Schema, rows: int) -> Iterator[pa.RecordBatch]:
    """Read one unit of `Source.units` as batches of at most `rows` rows, in the source's schema.

    Parquet row groups are streamed page by page; a unit that is a slice of a
    row group (`offset`, `rows`) reads past the rows before it.
    """
    cfg = cfg or InputConfig(path=".")
    keep = filter_expression(cfg.filter, schema) if cfg.filter else None
    for table in timed_items(_unit_tables(unit, cfg, schema, rows), "read"):
        if keep is not None:
            table = table.filter(keep)
        yield from table.to_batches(max_chunksize=rows)


def _unit_tables(unit: dict[str, Any], cfg: InputConfig, schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    if "file" not in unit:
        yield pa.Table.from_pylist(unit["rows"], schema=schema)
        return
    fs, path = arrow_filesystem(unit["file"], cfg.storage)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f, buffer_size=STREAM_BUFFER_BYTES)
        columns = [n for n in schema.names if n in parquet.schema_arrow.names]
        skip, left = unit.get("offset", 0), unit.get("rows")
        for batch in parquet.iter_batches(batch_size=rows, row_groups=[unit["row_group"]], columns=columns):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
            if left is not None:
                batch = batch.slice(0, left)
                left -= batch.num_rows
            table = pa.Table.from_batches([batch])
            for name, value in unit.get("partition", {}).items():
                if name in schema.names and name not in table.column_names:
                    table = table.append_column(name, pa.array([value] * table.num_rows).cast(schema.field(name).type))
            table = table.select([n for n in schema.names if n in table.column_names])
            yield table.cast(pa.schema([schema.field(n) for n in table.column_names]))
            if left == 0:
                return


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
    try:
        return detect_format(cfg.path, cfg.storage)
    except FileNotFoundError:
        raise ConfigError(f"input.path: {cfg.path!r} does not exist") from None


def open_source(cfg: InputConfig) -> Source:
    """Open the configured input; configuration faults raise `ConfigError` naming the field."""
    fmt = _detect_format(cfg)
    if fmt == "images":
        dataset = pads.dataset(_image_files_table(cfg))
        expr = filter_expression(cfg.filter, dataset.schema) if cfg.filter else None
        return Source(dataset, cfg.id_column, None, "uri", has_id=True, filter=expr, cfg=cfg)

    location = cfg.path
    if fmt == "delta":
        from vb_batch.io.delta import open_delta

        try:
            dataset = open_delta(cfg.path, cfg.storage, vb_metadata=False)
        except FileNotFoundError:
            raise ConfigError(f"input.path: no Delta table at {cfg.path!r}") from None
    elif fmt == "iceberg":
        from vb_batch.io import iceberg

        if cfg.table:
            table = iceberg.iceberg_table(iceberg.iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
            if table is None:
                raise ConfigError(f"input.table: no Iceberg table {cfg.table!r} in input.catalog")
        else:  # a table's location: read its newest metadata file
            table = iceberg.open_iceberg_path(cfg.path, cfg.storage)
        dataset = iceberg.open_iceberg(table, cfg.storage, row_filter=cfg.filter)
        location = iceberg.iceberg_location(table)
    else:
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
    has_id = cfg.id_column in names
    if not has_id and "id_column" in cfg.model_fields_set:
        raise ConfigError(
            f"input.id_column: column {cfg.id_column!r} not in the input; columns: {names} "
            "(leave input.id_column out to use each row's URI or the SHA-256 of its image as its id)"
        )
    expr = filter_expression(cfg.filter, dataset.schema) if cfg.filter else None
    return Source(dataset, cfg.id_column, image_col, uri_col, has_id=has_id, filter=expr, location=location, cfg=cfg)
