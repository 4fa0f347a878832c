"""Lake tables in and out: Delta Lake (`deltalake`) and Iceberg (`pyiceberg`) sinks, sources and readers.

Sinks follow the protocol of `vb_batch.io.sinks` (check_mode, open, write,
staging + stage, commit, close) and reuse the Parquet sink's staging and file
writing; only the commit differs::

    <table>/_vb/staging/<run>/part-*.parquet   complete files being written (this process or workers)
    <table>/_vb/intents/<run>-<seq>.json       a commit in flight: the files it moves into the table
    <table>/part-<run>-*.parquet               Delta data files (Iceberg: <location>/data/part-*.parquet)
    <table>/_vb/runs/<run>.json                summary of a finished run (no `_SUCCESS`: the log says what is done)

A commit moves the staged files next to the table's data (no rewrite) and adds
them in one transaction of the table's own log: `AddAction`s for Delta,
`add_files` for Iceberg. Nothing is visible before that transaction, so a run
that dies leaves no half commit; files it had moved are deleted by the next
run (the Delta app transaction `vb_batch:<run>` / the Iceberg snapshot
property `vb.commit` tells whether the commit landed). Partitioned tables are
the exception: staged files hold rows of many partitions, so they are streamed
through the format's own writer (`write_deltalake`, pyiceberg's data-file
writer), which splits them; that rewrites the rows once.

Metadata: Delta keeps Arrow field metadata (`vb.kind`, `vb.unit`, `vb.scale`,
`vb.legend`, ...) in its schema; the job-level keys (`vb.job`, `vb.run_id`,
...) go into each commit's info. Iceberg has no field metadata: every map
column's metadata is the table property `vb.column.<name>` (JSON), and the
job-level keys are table properties set in the same transaction as the data.
`open_delta` / `open_iceberg` put both back on the Arrow schema, so readers
see the same schema as for a Parquet output. Row filters (`input.filter`) are
pyiceberg's row-filter strings, also turned into pyarrow expressions.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vb_batch.config import ConfigError, OutputConfig, StorageOptions
from vb_batch.errors import OutputExistsError
from vb_batch.io.filesystems import (
    arrow_filesystem,
    delta_storage_options,
    fsspec_filesystem,
    iceberg_io_properties,
    is_local,
    split_scheme,
)
from vb_batch.io.sinks import META_DIR, ParquetSink

log = logging.getLogger(__name__)

JOB_KEYS = ("vb.version", "vb.run_id", "vb.job", "vb.image_column", "vb.uri_column")
COLUMN_PROPERTY = "vb.column."
DELTA_APP = "vb_batch:"


# ---------------------------------------------------------------------------- shared helpers


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


def row_filter_expression(text: str, schema: pa.Schema, field: str = "input.filter") -> pc.Expression:
    """A pyiceberg row-filter string ("day = '2026-11-01' and n > 3") as a pyarrow expression over `schema`."""
    from pyiceberg.expressions.parser import parse
    from pyiceberg.expressions.visitors import bind
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids, expression_to_pyarrow
    from pyiceberg.schema import assign_fresh_schema_ids

    expression = parse(text)
    names = sorted(set(_referenced_columns(expression)))
    nested = [name for name in names if "." in name and name not in schema.names]
    if nested:
        raise ConfigError(f"{field}: filters compare top-level columns only, not {nested}")
    missing = [name for name in names if name not in schema.names]
    if missing:
        raise ConfigError(f"{field}: no column(s) {missing} in the input; columns: {schema.names}")
    try:  # typed literals come from binding to the columns' types ('2026-11-01' as a date, ...)
        columns = assign_fresh_schema_ids(_pyarrow_to_schema_without_ids(pa.schema([schema.field(n) for n in names])))
        return expression_to_pyarrow(bind(columns, expression, case_sensitive=True))
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc} in {text!r}") from None


def _referenced_columns(expression) -> list[str]:
    """Column names a parsed (unbound) pyiceberg expression refers to."""
    names = [expression.term.name] if hasattr(expression, "term") else []
    for part in ("left", "right", "child"):
        if hasattr(expression, part):
            names += _referenced_columns(getattr(expression, part))
    return names


# ---------------------------------------------------------------------------- Delta


def delta_table(uri: str, storage: StorageOptions | None):
    """The `DeltaTable` at `uri`, or None when there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    # Not `DeltaTable.is_deltatable` / `.history()`: they hold the GIL through their requests,
    # which stalls every other thread of the process (an S3 server in the same process deadlocks).
    try:
        return DeltaTable(local_uri(uri), storage_options=delta_storage_options(uri, storage))
    except TableNotFoundError:
        return None


def delta_job_metadata(uri: str, storage: StorageOptions | None, version: int) -> dict[str, str]:
    """The job-level `vb.*` keys of the newest vb_batch commit, from the commit infos in `_delta_log/`."""
    fs, root = fsspec_filesystem(uri, storage)
    for v in range(version, -1, -1):
        try:
            with fs.open(posixpath.join(root, "_delta_log", f"{v:020d}.json"), "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:  # expired by log retention: nothing older is left either
            break
        for line in lines:
            info = json.loads(line).get("commitInfo") or {}
            if "vb.job" in info:
                return {k: str(info[k]) for k in JOB_KEYS if k in info}
    return {}


def open_delta(uri: str, storage: StorageOptions | None = None, vb_metadata: bool = True) -> pads.Dataset:
    """The current version of a Delta table as a pyarrow dataset, read through vb_batch's filesystem.

    Fragments are the table's Parquet files (absolute paths in
    `arrow_filesystem(uri)`), with partition values as partition expressions;
    the schema carries field metadata and (`vb_metadata`: a vb_batch output)
    the job-level `vb.*` keys of the latest vb_batch commit in the history.
    """
    table = delta_table(uri, storage)
    if table is None:
        raise FileNotFoundError(f"no Delta table at {uri!r}")
    fs, root = arrow_filesystem(uri, storage)
    scan = table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, fs))
    files = [(posixpath.join(root, f.path), f.partition_expression) for f in scan.get_fragments()]
    job = delta_job_metadata(uri, storage, table.version()) if vb_metadata else {}
    return file_dataset(files, with_metadata(scan.schema, {}, job), fs)


def _delta_stats(meta: pq.FileMetaData) -> str:
    """Delta `add.stats` from a Parquet footer: row count, nulls and min/max of top-level plain columns."""
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for i in range(meta.num_columns):
        columns = [meta.row_group(g).column(i) for g in range(meta.num_row_groups)]
        name = columns[0].path_in_schema if columns else ""
        if not columns or "." in name or not all(c.statistics for c in columns):
            continue
        stats["nullCount"][name] = sum(c.statistics.null_count for c in columns)
        if not all(c.statistics.has_min_max for c in columns):
            continue
        lows, highs = [c.statistics.min for c in columns], [c.statistics.max for c in columns]
        plain = all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in lows + highs)
        finite = plain and all(v == v and abs(v) != float("inf") for v in lows + highs if isinstance(v, float))
        if finite and all(len(v) <= 64 for v in lows + highs if isinstance(v, str)):
            stats["minValues"][name], stats["maxValues"][name] = min(lows), max(highs)
    return json.dumps(stats)


# ---------------------------------------------------------------------------- Iceberg


def iceberg_catalog(properties: dict[str, Any], storage: StorageOptions | None = None):
    """pyiceberg `load_catalog` with `properties` (`name` picks a configured catalog), FileIO from `storage`."""
    from pyiceberg.catalog import load_catalog

    props = {k: str(v) for k, v in properties.items()}
    name = props.pop("name", "default")
    return load_catalog(name, **{**iceberg_io_properties(storage), **props})


def iceberg_table(catalog, name: str):
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(name)
    except NoSuchTableError:
        return None


def iceberg_schema(table) -> pa.Schema:
    """The table's Arrow schema with vb_batch's field and job metadata restored from table properties."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    props = table.properties
    columns = {k[len(COLUMN_PROPERTY):]: json.loads(v) for k, v in props.items() if k.startswith(COLUMN_PROPERTY)}
    job = {k: props[k] for k in JOB_KEYS if k in props}
    return with_metadata(schema_to_pyarrow(table.schema(), include_field_ids=False), columns, job)


def open_iceberg(table, storage: StorageOptions | None = None, row_filter: str | None = None) -> pads.Dataset:
    """An Iceberg table's current snapshot as a pyarrow dataset of its data files.

    `row_filter` (pyiceberg syntax) prunes files by partition and column
    statistics; filter rows with `row_filter_expression` on top. Tables with
    delete files (row-level deletes) cannot be read file by file: compact them
    first.
    """
    schema = iceberg_schema(table)
    tasks = list(table.scan(row_filter=row_filter or "true").plan_files())
    if any(task.delete_files for task in tasks):
        raise ConfigError(
            f"iceberg table {table.name()}: it has row-level delete files, which vb_batch cannot read "
            "file by file; rewrite its data files first (e.g. Spark's rewrite_data_files)"
        )
    fs, _ = arrow_filesystem(table.location(), storage)
    files = [(arrow_filesystem(task.file.file_path, storage)[1], None) for task in tasks]
    return file_dataset(files, schema, fs)


def iceberg_location(table) -> str:
    """Where an Iceberg table keeps vb_batch's own files (`_vb/`, the report): its location."""
    return table.location().rstrip("/")


def open_iceberg_path(location: str, storage: StorageOptions | None = None):
    """A read-only Iceberg table from its location alone (the newest `metadata/*.metadata.json`)."""
    from pyiceberg.table import StaticTable

    fs, root = fsspec_filesystem(location, storage)
    found = fs.glob(posixpath.join(root, "metadata", "*.metadata.json"))
    if not found:
        raise FileNotFoundError(f"no Iceberg metadata under {location!r}")

    def version(path: str) -> int:
        head = posixpath.basename(path).split("-")[0].removeprefix("v").split(".")[0]
        return int(head) if head.isdigit() else -1

    newest = max(found, key=version)
    scheme = split_scheme(location)[0]
    url = newest if scheme == "file" else f"{scheme}://{newest}"
    return StaticTable.from_metadata(url, properties=iceberg_io_properties(storage))


# ---------------------------------------------------------------------------- sinks


class _LakeSink(ParquetSink):
    """Staging and writing as the Parquet sink; commits go through a table format's log.

    Subclasses say whether the table exists and has rows, read the committed
    ids, check a job fits the table, and commit staged files.
    """

    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id"):
        super().__init__(cfg, run_id, schema, id_column)
        for name in cfg.partition_by:
            if name not in schema.names:
                raise ConfigError(f"output.partition_by: column {name!r} is not in the output; columns: {schema.names}")
            typ = schema.field(name).type
            if not (pa.types.is_primitive(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                raise ConfigError(f"output.partition_by: column {name!r} has type {typ}; partition by plain columns")
        self._commits = 0

    # ---------------------------------------------------------------- format hooks
    def describe(self) -> str:
        """The output in the user's words, for messages."""
        raise NotImplementedError

    def _exists(self) -> bool:
        raise NotImplementedError

    def _ensure_table(self) -> None:
        """Create the table when the format needs it before files are staged (Iceberg: its location)."""

    def _has_rows(self) -> bool:
        raise NotImplementedError

    def _check_table(self) -> None:
        """Raise `ConfigError` when this job's output does not fit the existing table (append / resume)."""
        raise NotImplementedError

    def _commit_added(self, paths: list[str], mode: str, key: str) -> None:
        """Commit files already in the table's data directory (`paths` in `self.fs`), atomically."""
        raise NotImplementedError

    def _commit_rewritten(self, paths: list[str], mode: str, key: str) -> None:
        """Commit the rows of staged files through the format's writer (partitioned tables)."""
        raise NotImplementedError

    def _is_committed(self, key: str) -> bool:
        raise NotImplementedError

    def _data_path(self, name: str) -> str:
        return self._path(name)

    # ---------------------------------------------------------------- protocol
    def check_mode(self) -> None:
        if self.cfg.mode == "error" and self._has_rows():
            raise OutputExistsError(
                f"{self.describe()} already holds rows; set output.mode to overwrite, append or resume"
            )

    def open(self) -> set[Any]:
        self.check_mode()
        self._ensure_table()
        self._recover()
        if self._exists() and self.cfg.mode != "overwrite":
            self._check_table()
        return self.committed_ids() if self.cfg.mode == "resume" and self._exists() else set()

    def _recover(self) -> None:
        """Delete files that a crashed run moved into the table but never committed; clear dead staging."""
        for path in sorted(self.fs.glob(self._path(META_DIR, "intents", "*.json"))):
            with self.fs.open(path, "rb") as f:
                record = json.loads(f.read())
            if not self._is_committed(record["key"]):
                for moved in record["files"]:
                    if self.fs.exists(moved):
                        log.warning("removing %s: moved into the table by a run that crashed before committing it", moved)
                        self.fs.rm(moved)
            self.fs.rm(path)
        staging_root = self._path(META_DIR, "staging")
        if self.fs.exists(staging_root):
            self.fs.rm(staging_root, recursive=True)

    def commit(self) -> None:
        """Make every staged file visible in one transaction of the table's log."""
        if self._writer is not None:
            self._close_file()
        if not self._staged:
            return
        self._commit_staged(self._staged)
        self.files_committed += self._staged
        self._staged, self._staged_rows = [], 0

    def _commit_staged(self, names: list[str]) -> None:
        mode = "overwrite" if self.cfg.mode == "overwrite" and self._commits == 0 else "append"
        key = f"{self.run_id}-{self._commits:05d}"
        staged = [posixpath.join(self.staging, name) for name in names]
        if self.cfg.partition_by:
            self._commit_rewritten([self.fs._strip_protocol(p) for p in staged], mode, key)
        else:
            targets = [self.fs._strip_protocol(self._data_path(name)) for name in names]
            record_path = self._path(META_DIR, "intents", f"{key}.json")
            self._write_bytes(record_path, json.dumps({"key": key, "files": targets}).encode())
            for directory in {posixpath.dirname(t) for t in targets}:
                self.fs.makedirs(directory, exist_ok=True)
            for source, target in zip(staged, targets):
                self.fs.mv(source, target)
            self._commit_added(targets, mode, key)
            self.fs.rm(record_path)
        self._commits += 1

    def close(self, success: bool, summary: dict[str, Any] | None = None) -> None:
        """Commit what was written; a run that finished without rows still creates / overwrites the table."""
        self.commit()
        if success and self._commits == 0 and (self.cfg.mode == "overwrite" or not self._exists()):
            self._commit_staged([])
        staging_root = posixpath.dirname(self.staging)
        if self.fs.exists(staging_root):
            self.fs.rm(staging_root, recursive=True)
        if summary is not None:
            self._write_bytes(self._path(META_DIR, "runs", f"{self.run_id}.json"), json.dumps(summary, indent=2).encode())

    def _check_same_columns(self, existing: pa.Schema, existing_meta: dict[str, dict[str, str]], ours: pa.Schema) -> None:
        """`existing` and `ours` (this job's schema) as the format stores them; metadata as `vb.*` strings."""
        ours = {f.name: str(f.type) for f in ours}
        theirs = {f.name: str(f.type) for f in existing}
        if ours != theirs:
            diff = sorted(set(ours.items()) ^ set(theirs.items()))
            raise ConfigError(
                f"output.mode {self.cfg.mode}: {self.describe()} has other columns than this job writes "
                f"(differing: {diff}); use output.mode=overwrite or another table"
            )
        for f in self.schema:
            ours_meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
            if ours_meta != existing_meta.get(f.name, {}):
                raise ConfigError(
                    f"output.mode {self.cfg.mode}: column {f.name!r} of {self.describe()} was written with other "
                    f"settings (field metadata {existing_meta.get(f.name)} != {ours_meta}); "
                    "use output.mode=overwrite or another table"
                )


class DeltaSink(_LakeSink):
    """A Delta table at `output.path` (local or object storage), one table version per commit.

    >>> cfg = {"input": {"path": "images/"}, "output": {"format": "delta", "path": "s3://lake/labels", "mode": "resume"}}
    >>> vb_batch.annotate(cfg)   # doctest: +SKIP
    """

    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id"):
        super().__init__(cfg, run_id, schema, id_column)
        self.uri = local_uri(cfg.path)
        self.storage_options = delta_storage_options(cfg.path, cfg.storage)
        self.app_id = DELTA_APP + run_id

    def describe(self) -> str:
        return f"output.path {self.cfg.path!r} (delta)"

    def _table(self):
        return delta_table(self.cfg.path, self.cfg.storage)

    def _exists(self) -> bool:
        return self._table() is not None

    def check_mode(self) -> None:
        # A Parquet dataset that vb_batch wrote is no Delta table: never put a table over it.
        parquet_marks = (self._path(META_DIR, "commits"), self._path("_SUCCESS"))
        if not self._exists() and any(self.fs.exists(mark) for mark in parquet_marks):
            raise ConfigError(f"output.path {self.cfg.path!r} holds a Parquet dataset, not a Delta table; use another path")
        super().check_mode()

    def _has_rows(self) -> bool:
        table = self._table()
        return table is not None and bool(table.file_uris())

    def _check_table(self) -> None:
        from deltalake import Schema

        table = self._table()
        existing = pa.schema(table.schema().to_arrow())
        meta = {f.name: {k: v for k, v in (f.metadata or {}).items() if k.startswith("vb.")} for f in table.schema().fields}
        self._check_same_columns(existing, meta, pa.schema(Schema.from_arrow(self.schema).to_arrow()))
        if list(table.metadata().partition_columns) != list(self.cfg.partition_by):
            raise ConfigError(
                f"output.partition_by: the Delta table is partitioned by {table.metadata().partition_columns}, "
                f"not {self.cfg.partition_by}"
            )

    def committed_ids(self) -> set[Any]:
        table = open_delta(self.cfg.path, self.cfg.storage).to_table(columns=[self.id_column])
        return set(table.column(self.id_column).to_pylist())

    def _is_committed(self, key: str) -> bool:
        run_id, seq = key.rsplit("-", 1)
        table = self._table()
        done = table.transaction_version(DELTA_APP + run_id) if table is not None else None
        return done is not None and done >= int(seq)

    def _commit_properties(self, key: str):
        from deltalake.transaction import CommitProperties, Transaction

        seq = int(key.rsplit("-", 1)[1])
        return CommitProperties(
            custom_metadata=job_metadata(self.schema), app_transactions=[Transaction(self.app_id, seq)]
        )

    def _commit_added(self, paths: list[str], mode: str, key: str) -> None:
        from deltalake import Schema
        from deltalake.transaction import AddAction, create_table_with_add_actions

        actions = []
        for path in paths:
            info = self.arrow_fs.get_file_info(path)
            meta = pq.read_metadata(path, filesystem=self.arrow_fs)
            actions.append(AddAction(posixpath.relpath(path, self.root), info.size, {}, int(time.time() * 1000), True,
                                     _delta_stats(meta)))
        table = self._table()
        props = self._commit_properties(key)
        if table is None:
            create_table_with_add_actions(self.uri, Schema.from_arrow(self.schema), actions, mode="error",
                                          storage_options=self.storage_options, commit_properties=props)
        else:
            table.create_write_transaction(actions, mode=mode, schema=self.schema, commit_properties=props)

    def _commit_rewritten(self, paths: list[str], mode: str, key: str) -> None:
        from deltalake import write_deltalake

        reader = pads.dataset(paths, schema=self.schema, format="parquet", filesystem=self.arrow_fs).scanner().to_reader()
        write_deltalake(self.uri, reader, partition_by=self.cfg.partition_by, mode=mode,
                        schema_mode="overwrite" if mode == "overwrite" else None,
                        storage_options=self.storage_options, commit_properties=self._commit_properties(key))


class IcebergSink(_LakeSink):
    """An Iceberg table `output.table` in the catalog `output.catalog`, one snapshot per commit.

    The table is created on first use (identity partitions on
    `output.partition_by`); staging and run records live under its location.
    """

    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id"):
        super().__init__(cfg, run_id, schema, id_column)
        self.catalog = iceberg_catalog(cfg.catalog, cfg.storage)
        self.table = iceberg_table(self.catalog, cfg.table)
        if self.table is not None:
            self._use_location(iceberg_location(self.table))

    def describe(self) -> str:
        return f"output.table {self.cfg.table!r} (iceberg)"

    def __getstate__(self) -> dict[str, Any]:
        # Engines ship the sink's staging to workers; a catalog (a database connection) stays here.
        return {**self.__dict__, "catalog": None, "table": None}

    def _use_location(self, location: str) -> None:
        self.location = location
        self.fs, self.root = fsspec_filesystem(location, self.cfg.storage)
        self.arrow_fs, _ = arrow_filesystem(location, self.cfg.storage)
        # A URL, not a path: workers writing staged files (`write_part`) find the filesystem from it.
        self.staging = f"{location}/{META_DIR}/staging/{self.run_id}"

    def _exists(self) -> bool:
        return self.table is not None

    def _has_rows(self) -> bool:
        snapshot = self.table.current_snapshot() if self.table is not None else None
        return snapshot is not None and int(snapshot.summary.get("total-records") or 0) > 0

    def _check_table(self) -> None:
        from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids, schema_to_pyarrow

        existing = iceberg_schema(self.table)
        meta = {f.name: {k.decode(): v.decode() for k, v in (f.metadata or {}).items()} for f in existing}
        ours = schema_to_pyarrow(_pyarrow_to_schema_without_ids(self.schema), include_field_ids=False)
        self._check_same_columns(existing, meta, ours)
        if self._partition_columns() != list(self.cfg.partition_by):
            raise ConfigError(
                f"output.partition_by: the Iceberg table is partitioned by {self._partition_columns()}, "
                f"not {self.cfg.partition_by}"
            )

    def _partition_columns(self) -> list[str]:
        schema = self.table.schema()
        return [schema.find_column_name(f.source_id) for f in self.table.spec().fields]

    def _ensure_table(self) -> None:
        if self.table is not None:
            return
        namespace = self.cfg.table.rsplit(".", 1)[0] if "." in self.cfg.table else None
        if namespace is None:
            raise ConfigError(f'output.table: {self.cfg.table!r} needs a namespace: "namespace.name"')
        self.catalog.create_namespace_if_not_exists(namespace)
        plain = pa.schema([f.remove_metadata() for f in self.schema])
        with self.catalog.create_table_transaction(self.cfg.table, schema=plain, properties=self._properties()) as tx:
            if self.cfg.partition_by:
                with tx.update_spec() as spec:
                    for name in self.cfg.partition_by:
                        spec.add_identity(name)
        self.table = self.catalog.load_table(self.cfg.table)
        self._use_location(iceberg_location(self.table))

    def _properties(self) -> dict[str, str]:
        """Field and job metadata as table properties (Iceberg has no field metadata)."""
        props = dict(job_metadata(self.schema))
        for f in self.schema:
            meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
            if meta:
                props[COLUMN_PROPERTY + f.name] = json.dumps(meta, sort_keys=True)
        return props

    def committed_ids(self) -> set[Any]:
        table = self.table.scan(selected_fields=(self.id_column,)).to_arrow()
        return set(table.column(self.id_column).to_pylist())

    def _is_committed(self, key: str) -> bool:
        return self.table is not None and any(s.summary.get("vb.commit") == key for s in self.table.snapshots())

    def _data_path(self, name: str) -> str:
        return f"{self.location}/data/{name}"

    def _transaction(self, mode: str, key: str):
        """A transaction that carries this run's properties, and replaces the schema for an overwrite."""
        tx = self.table.transaction()
        if mode == "overwrite":
            from pyiceberg.expressions import AlwaysTrue

            current = {f.name for f in self.table.schema().fields}
            plain = pa.schema([f.remove_metadata() for f in self.schema])
            with tx.update_schema(allow_incompatible_changes=True) as update:
                update.union_by_name(plain)
                for name in current - set(plain.names):
                    update.delete_column(name)
            tx.delete(AlwaysTrue(), snapshot_properties={"vb.commit": key})
            stale = [k for k in self.table.properties if k.startswith(COLUMN_PROPERTY)]
            if stale:
                tx.remove_properties(*stale)
        tx.set_properties(self._properties())
        return tx

    def _commit_added(self, paths: list[str], mode: str, key: str) -> None:
        scheme = split_scheme(self.location)[0]
        urls = [f"{scheme}://{p}" for p in paths]
        tx = self._transaction(mode, key)
        if urls:
            tx.add_files(urls, snapshot_properties={"vb.run_id": self.run_id, "vb.commit": key})
        tx.commit_transaction()

    def _commit_rewritten(self, paths: list[str], mode: str, key: str) -> None:
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        tx = self._transaction(mode, key)
        counter = itertools.count()
        with tx.update_snapshot(snapshot_properties={"vb.run_id": self.run_id, "vb.commit": key}).fast_append() as append:
            for path in paths:
                rows = pq.read_table(path, filesystem=self.arrow_fs, schema=self.schema)
                plain = rows.cast(pa.schema([f.remove_metadata() for f in rows.schema]))
                for data_file in _dataframe_to_data_files(tx.table_metadata, df=plain, io=self.table.io,
                                                          write_uuid=append.commit_uuid, counter=counter):
                    append.append_data_file(data_file)
        tx.commit_transaction()
