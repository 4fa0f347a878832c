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

A Hugging Face image cell is read from its `bytes`; a cell with null bytes and a
`path` (what `datasets.Image()` stores for images built from files) names its
image like a URI cell, read under the same fetch rules (`image_path_uri`): a
URL or absolute path as it is, a relative path under the input's folder when
`input.path` is local (a relative path of a remote input is the row's
`uri_invalid`); a cell with neither is `null_image`.

A row without an id gets a stable one: its URI (a path-only image cell: its
`path` as stored), or the SHA-256 of its bytes.
Rows that would share an id are found before any row runs (`duplicate_rows`,
which reads the ids, or hashes the images, with each row's place: the file
and its row in that file, the numbering `read_unit` uses); under
`input.duplicate_ids` a unit carries the rows it must skip (`skip_rows`:
`first`) or that its ids carry the row's place (`place_ids`: `position`,
"<id>@<file>#<row>").
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError, InputConfig
from vb_batch.errors import RowError
from vb_batch.io.filesystems import arrow_filesystem, delta_storage_options, fsspec_filesystem, split_scheme
from vb_batch.io.filters import filter_expression
from vb_batch.io.formats import detect_format
from vb_batch.io.positions import InputState, done_files, file_listing, input_identity, relative_name
from vb_batch.io.uri import scheme_of, shown_text
from vb_batch.timing import timed_items

log = logging.getLogger(__name__)

IMAGE_COLUMN_GUESSES = ("image", "image_bytes", "bytes", "img")
URI_COLUMN_GUESSES = ("uri", "url", "path", "image_uri", "image_url", "image_path")


def image_bytes(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The bytes of an image column: plain binary, or the `bytes` field of a `struct<bytes, path>`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return pc.struct_field(column, "bytes")
    return column


def image_paths(column: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """Per row, the `path` of a Hugging Face image cell that has no bytes; None where the bytes are the image."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
        return [None] * len(column)
    path = pc.struct_field(column, "path").cast(pa.string())
    return pc.if_else(pc.is_null(pc.struct_field(column, "bytes")), path, pa.scalar(None, pa.string())).to_pylist()


def input_folder(cfg: InputConfig) -> str | None:
    """The local folder a relative image path resolves against: `input.path` (a file's parent); None if remote."""
    scheme, path = split_scheme(cfg.path)
    if not cfg.path or scheme not in ("file", "local"):
        return None
    path = os.path.abspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def image_path_uri(path: str, folder: str | None) -> str:
    """The URI a path-only image cell names, for `vb_batch.io.fetch.read_uri` (which applies the fetch rules).

    A URL or an absolute path as written; a relative path (HF stores the path it was given)
    joined to `folder` (`input_folder`), then checked like any URI (`..` and symlinks resolved,
    `input.allowed_prefixes`). A relative path without a local input folder is the row's
    `uri_invalid`: it is never read from the working directory.
    """
    if not path or not _is_relative_path(path):
        return path
    if folder is None:
        raise RowError("uri_invalid", f"{shown_text(path)}: a relative image path, and input.path is not a local "
                                      "folder to resolve it against; store absolute paths or URLs")
    return os.path.join(folder, path)


def _is_relative_path(path: str) -> bool:
    return scheme_of(path) == "file" and not path.startswith("/") and not path.lower().startswith(("file:", "local:"))


def content_id(data: bytes | None) -> str:
    return "sha256:" + hashlib.sha256(data or b"").hexdigest()


# A column `read_unit` adds under input.duplicate_ids: position, "<file>#<row>"; `with_ids` consumes it.
ROW_PLACE_COLUMN = "__vb_row_place"


def derived_ids(batch: pa.RecordBatch | pa.Table, image_column: str | None, uri_column: str | None) -> pa.Array:
    """The ids vb_batch gives rows without an id column: the URI, or the SHA-256 of the image bytes.

    A path-only Hugging Face image cell's id is its `path` as stored, as a URI cell's is its URI.
    """
    if uri_column:
        return batch.column(batch.schema.get_field_index(uri_column)).cast(pa.string())
    column = batch.column(batch.schema.get_field_index(image_column))
    cells = image_bytes(column).to_pylist()
    return pa.array([content_id(b) if path is None else path for b, path in zip(cells, image_paths(column))],
                    pa.string())


def with_ids(batch: pa.RecordBatch, id_column: str, image_column: str | None, uri_column: str | None) -> pa.RecordBatch:
    """The batch with its id column first when it had none: the URI, or the SHA-256 of the bytes (+ the row's place)."""
    place = None
    if ROW_PLACE_COLUMN in batch.schema.names:
        at = batch.schema.get_field_index(ROW_PLACE_COLUMN)
        place, batch = batch.column(at), batch.drop_columns([ROW_PLACE_COLUMN])
    if id_column in batch.schema.names:
        return batch
    ids = derived_ids(batch, image_column, uri_column)
    if place is not None:
        ids = pc.binary_join_element_wise(ids, place, "@")
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
    # input.duplicate_ids: first: {file URL: rows in that file to skip}, set by the duplicate-id check.
    skip_rows: dict[str, list[int]] | None = None
    kind: str = "files"  # files (Parquet), delta, iceberg or images: what an input position records
    version: int | None = None  # delta: the table version read; iceberg: the snapshot id read
    table: Any = None  # iceberg: the pyiceberg table read (for the files of a recorded snapshot)
    # Files an input position called done, left out of `dataset` (`skip_done`): URL -> rows (None: unknown)
    unread: dict[str, int | None] = field(default_factory=dict)
    # Committed ids among this input's pending ones: `units` leaves out those whose ids all are
    done_ids: pa.Array | None = None
    pruned_rows: int = 0  # rows of units left out by `done_ids`, read by their id column only
    _done_lookup: tuple[pa.Array, frozenset] | None = field(default=None, repr=False)

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

    # ------------------------------------------------------------ input positions (`vb_batch.io.positions`)
    def state(self) -> InputState | None:
        """Where this input stands now, as an input position records it (None: an image listing)."""
        if self.kind == "images" or self.cfg is None:
            return None
        state = InputState(self.kind, input_identity(self.cfg, self.location), version=self.version)
        if self.kind == "files":
            state.files = file_listing(self.location or self.cfg.path, self.cfg)
        return state

    def done_by(self, position: dict[str, Any], state: InputState) -> dict[str, int | None]:
        """URL (as units name files) -> rows, of every data file of the dataset that `position` says is done."""
        urls = [self.file_url(f) for f in self.dataset.get_fragments()] + list(self.unread)
        if self.kind == "files":
            by_name = {relative_name(url, self.root()): url for url in urls}
            return {by_name[name]: rows for name, rows in done_files(position, state).items() if name in by_name}
        version = position.get("input_version")
        if not isinstance(version, int):
            return {}
        try:
            recorded = (_delta_files(self.cfg, version) if self.kind == "delta"
                        else _iceberg_files(self.table, version, self.cfg))
            current = (_delta_files(self.cfg, self.version) if self.kind == "delta"
                       else _iceberg_files(self.table, self.version, self.cfg))
        except Exception as exc:  # the version was vacuumed / the snapshot expired: nothing counts as done
            log.info("input position %s %s cannot be read (%s); reading the whole input", self.kind, version, exc)
            return {}
        paths = {unquote(split_scheme(url)[1]): url for url in urls}
        # The log counts a file's rows before input.filter: with a filter, how many it keeps is not known.
        return {paths[p]: None if self.filter is not None else current.get(p) for p in recorded if p in paths}

    def skip_done(self, done: dict[str, int | None]) -> None:
        """Leave the files `done` names out of the dataset: no later step opens them (`unread`)."""
        if not done or not isinstance(self.dataset, pads.FileSystemDataset):
            return
        kept = [f for f in self.dataset.get_fragments() if self.file_url(f) not in done]
        self.unread = dict(done)
        self.dataset = pads.FileSystemDataset(kept, self.dataset.schema, self.dataset.format, self.dataset.filesystem)

    def rows_by_file(self) -> dict[str, int]:
        """Rows per data file still in the dataset, by relative name (the files kind of position)."""
        root = self.root()
        return {relative_name(self.file_url(f), root): f.count_rows(filter=self.filter) if self.filter is not None
                else f.metadata.num_rows for f in self.dataset.get_fragments()}

    def root(self) -> str:
        """The input's root as its filesystem names paths (what positions name files relative to)."""
        return fsspec_filesystem(self.location or self.cfg.path, self.cfg.storage)[1]

    def _prune_column(self) -> str | None:
        """The column whose values are the ids, read to leave done units out (None: ids need the images)."""
        if self.has_id:
            return self.id_column
        if self.uri_column and (self.cfg is None or self.cfg.duplicate_ids != "position"):
            return self.uri_column
        return None

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
            units = []
            self.pruned_rows = 0
            place_ids = not self.has_id and self.cfg is not None and self.cfg.duplicate_ids == "position"
            for fragment in self.dataset.get_fragments(filter=self.filter):
                url = self.file_url(fragment)
                # Partition values live in a lake table's log, not in its files: the unit carries them.
                keys = pads.get_partition_keys(fragment.partition_expression)
                partition = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in keys.items()}
                skip = sorted((self.skip_rows or {}).get(url, []))
                starts = _row_group_starts(fragment) if skip else []
                for group in fragment.split_by_row_group(self.filter, schema=self.dataset.schema):
                    info = group.row_groups[0]
                    if self._all_done(group, skip):
                        self.pruned_rows += info.num_rows
                        continue
                    unit = {"file": url, "row_group": info.id, **({"partition": partition} if partition else {})}
                    if skip:
                        unit["skip_rows"] = [r for r in skip if starts[info.id] <= r < starts[info.id] + info.num_rows]
                    if place_ids:
                        unit["place_ids"] = self.place_name(url)
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

    def _all_done(self, group: pads.FileFragment, skip: list[int]) -> bool:
        """Whether every id of a row group (after `input.filter`) is in `done_ids`: read by its id column only."""
        column = self._prune_column()
        if self.done_ids is None or not len(self.done_ids) or column is None or skip:
            return False
        ids = group.to_table(columns=[column], filter=self.filter, schema=self.dataset.schema).column(column)
        if self._done_lookup is None or self._done_lookup[0] is not self.done_ids:
            # One lookup for every row group (`is_in` would hash all of `done_ids` again for each).
            self._done_lookup = (self.done_ids, frozenset(self.done_ids.to_pylist()))
        done = self._done_lookup[1]
        return all(i is not None and i in done for i in ids.to_pylist())

    def file_url(self, fragment: pads.FileFragment) -> str:
        """The URL a unit names a data file by."""
        scheme = split_scheme(self.location)[0] if self.location else "file"
        return fragment.path if scheme in ("file", "local") else f"{scheme}://{fragment.path}"

    def place_name(self, url: str) -> str:
        """A data file as a row's place names it: its path under the input (the file name, elsewhere)."""
        root = split_scheme(self.location)[1].rstrip("/") + "/" if self.location else ""
        path = split_scheme(url)[1]
        return path[len(root):] if root and path.startswith(root) else path.rsplit("/", 1)[-1]


def repeated_ids(source: Source, rows: int = 4096) -> dict[Any, list[tuple[str, int]]]:
    """Every id that more than one row has, with those rows' places (file URL, row in file) in input order.

    Reads what the ids come from (the id column, the URI column, or the image bytes, hashed as
    `with_ids` does) with the rows `input.filter` keeps, numbered as `read_unit` numbers them, so
    the places can be handed to the units. An input that is not a set of files (an image
    listing, whose ids are its file names) has none.
    """
    if not isinstance(source.dataset, pads.FileSystemDataset):
        return {}
    column = source.id_column if source.has_id else (source.uri_column or source.image_column)
    cfg = source.cfg or InputConfig(path=".")
    # The filter may name any column: then every column but the image bytes (unless they are the ids).
    schema = pa.schema([f for f in source.dataset.schema
                        if f.name == column or (cfg.filter and f.name not in (source.image_column, source.uri_column))])
    files, ids, places = [], [], []
    for unit in source.units(max_rows=None):
        unit = {k: v for k, v in unit.items() if k not in ("skip_rows", "place_ids")}
        for table, rows_in_file in placed_tables(unit, cfg, schema, rows):
            ids.append(table.column(column).combine_chunks() if source.has_id
                       else derived_ids(table, source.image_column, source.uri_column))
            places.append(rows_in_file)
            files.append(pa.array([unit["file"]] * table.num_rows, pa.string()))
    if not ids:
        return {}
    ids_all = pa.concat_arrays(ids)
    counts = pc.value_counts(ids_all.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if not len(repeated):
        return {}
    at = pc.indices_nonzero(pc.is_in(ids_all, value_set=repeated))
    found: dict[Any, list[tuple[str, int]]] = {}
    for row_id, url, row in zip(ids_all.take(at).to_pylist(), pa.concat_arrays(files).take(at).to_pylist(),
                                pa.concat_arrays(places).take(at).to_pylist()):
        found.setdefault(row_id, []).append((url, row))
    return found


def _row_group_starts(fragment: pads.FileFragment) -> list[int]:
    """The row (in its file) each row group starts at."""
    meta = fragment.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return [sum(sizes[:i]) for i in range(len(sizes))]


# Bytes read ahead per column while streaming a row group: pages arrive as they are decoded, so a
# row group of a million images is read in batches, never held whole.
STREAM_BUFFER_BYTES = 1 << 20


def read_unit(unit: dict[str, Any], cfg: InputConfig | None, schema: pa.Schema, rows: int) -> Iterator[pa.RecordBatch]:
    """Read one unit of `Source.units` as batches of at most `rows` rows, in the source's schema.

    Parquet row groups are streamed page by page; a unit that is a slice of a
    row group (`offset`, `rows`) reads past the rows before it.
    """
    for table, _ in timed_items(placed_tables(unit, cfg, schema, rows), "read"):
        yield from table.to_batches(max_chunksize=rows)


def placed_tables(
    unit: dict[str, Any], cfg: InputConfig | None, schema: pa.Schema, rows: int
) -> Iterator[tuple[pa.Table, pa.Array | None]]:
    """`read_unit`'s tables with each row's place in its file (None for a listing), after `input.filter`.

    A unit's `skip_rows` are dropped; with `place_ids` the table gets `ROW_PLACE_COLUMN`.
    """
    cfg = cfg or InputConfig(path=".")
    keep = filter_expression(cfg.filter, schema) if cfg.filter else None
    skip = pa.array(unit.get("skip_rows") or [], pa.int64())
    for table, first_row in _unit_tables(unit, cfg, schema, rows):
        if first_row is None:
            yield (table.filter(keep) if keep is not None else table), None
            continue
        # The places ride along as a column, so that the filter keeps them in step with the rows.
        table = table.append_column(ROW_PLACE_COLUMN, pa.array(np.arange(first_row, first_row + table.num_rows)))
        if len(skip):
            table = table.filter(pc.invert(pc.is_in(table.column(ROW_PLACE_COLUMN), value_set=skip)))
        if keep is not None:
            table = table.filter(keep)
        places = table.column(ROW_PLACE_COLUMN).combine_chunks()
        table = table.drop_columns([ROW_PLACE_COLUMN])
        if unit.get("place_ids"):
            place = pc.binary_join_element_wise(unit["place_ids"], places.cast(pa.string()), "#")
            table = table.append_column(ROW_PLACE_COLUMN, place)
        yield table, places


def _unit_tables(
    unit: dict[str, Any], cfg: InputConfig, schema: pa.Schema, rows: int
) -> Iterator[tuple[pa.Table, int | None]]:
    """The unit's rows as tables, each with the row (in its file) it starts at (None: a listing's rows)."""
    if "file" not in unit:
        yield pa.Table.from_pylist(unit["rows"], schema=schema), None
        return
    fs, path = arrow_filesystem(unit["file"], cfg.storage)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f, buffer_size=STREAM_BUFFER_BYTES)
        columns = [n for n in schema.names if n in parquet.schema_arrow.names]
        skip, left = unit.get("offset", 0), unit.get("rows")
        row = sum(parquet.metadata.row_group(i).num_rows for i in range(unit["row_group"]))
        for batch in parquet.iter_batches(batch_size=rows, row_groups=[unit["row_group"]], columns=columns):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                row += batch.num_rows
                continue
            row += skip
            batch, skip = batch.slice(skip), 0
            if left is not None:
                batch = batch.slice(0, left)
                left -= batch.num_rows
            table = pa.Table.from_batches([batch])
            for name, value in unit.get("partition", {}).items():
                if name in schema.names and name not in table.column_names:
                    table = table.append_column(name, pa.array([value] * table.num_rows).cast(schema.field(name).type))
            table = table.select([n for n in schema.names if n in table.column_names])
            yield table.cast(pa.schema([schema.field(n) for n in table.column_names])), row
            row += table.num_rows
            if left == 0:
                return


def _delta_files(cfg: InputConfig, version: int | None) -> dict[str, int | None]:
    """Path (as the filesystem names it) -> rows, of the data files of a Delta table's version."""
    from deltalake import DeltaTable

    from vb_batch.io.tables.arrow import local_uri

    table = DeltaTable(local_uri(cfg.path), version=version,
                       storage_options=delta_storage_options(cfg.path, cfg.storage))
    actions = pa.table(table.get_add_actions(flatten=True))
    root = split_scheme(local_uri(cfg.path))[1].rstrip("/")
    rows = actions.column("num_records").to_pylist() if "num_records" in actions.column_names else [None] * len(actions)
    return {unquote(posixpath.join(root, path)): n for path, n in zip(actions.column("path").to_pylist(), rows)}


def _iceberg_files(table, snapshot_id: int | None, cfg: InputConfig) -> dict[str, int | None]:
    """Path (as the filesystem names it) -> rows, of the data files of an Iceberg snapshot."""
    if snapshot_id is None:
        return {}
    tasks = table.scan(row_filter=cfg.filter or "true", snapshot_id=snapshot_id).plan_files()
    return {unquote(split_scheme(t.file.file_path)[1]): t.file.record_count for t in tasks}


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
        return Source(dataset, cfg.id_column, None, "uri", has_id=True, filter=expr, cfg=cfg, kind="images")

    location, kind, version, handle = cfg.path, "files", None, None
    if fmt == "delta":
        from vb_batch.io.tables.delta import delta_table, open_delta

        handle = delta_table(cfg.path, cfg.storage)
        if handle is None:
            raise ConfigError(f"input.path: no Delta table at {cfg.path!r}")
        dataset = open_delta(cfg.path, cfg.storage, vb_metadata=False, table=handle)
        kind, version, handle = "delta", handle.version(), None
    elif fmt == "iceberg":
        from vb_batch.io import iceberg

        if cfg.table:
            table = iceberg.iceberg_table(iceberg.iceberg_catalog(cfg.catalog, cfg.storage), cfg.table)
            if table is None:
                raise ConfigError(f"input.table: no Iceberg table {cfg.table!r} in input.catalog")
        else:  # a table's location: read its newest metadata file
            table = iceberg.open_iceberg_path(cfg.path, cfg.storage)
        snapshot = table.current_snapshot()
        kind, handle, version = "iceberg", table, snapshot.snapshot_id if snapshot is not None else None
        dataset = iceberg.open_iceberg(table, cfg.storage, row_filter=cfg.filter, snapshot_id=version)
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
    return Source(dataset, cfg.id_column, image_col, uri_col, has_id=has_id, filter=expr, location=location, cfg=cfg,
                  kind=kind, version=version, table=handle)
