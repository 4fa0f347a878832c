"""The sink base of lake tables (Delta Lake, Iceberg): commits through the table's own log.

Sinks of table formats follow the protocol of `vb_batch.io.sinks.base` and reuse its
staging, ownership, lease and run records; only the commit differs (Iceberg keeps none of `_vb/`:
it stages in its `data/` folder and keeps the rest in table properties, see `vb_batch.io.sinks.iceberg`)::

    <table>/_vb/staging/<run>/part-*.parquet   complete files being written (this process or workers)
    <table>/_vb/intents/<run>-<seq>.json       a commit in flight: the files it moves into the table
    <table>/part-<run>-*.parquet               Delta data files (Iceberg: <location>/data/part-*.parquet)
    <table>/_vb/output.json                    what the table holds (the job fingerprint)
    <table>/_vb/runs/<run>.json                summary of a run (no `_SUCCESS`: the log says what is done)
    <table>/_vb/latest-run.json                names the latest run's record (Iceberg: property vb.last-run)

A commit moves the staged files next to the table's data (no rewrite) and adds
them in one transaction of the table's own log: `AddAction`s for Delta,
`add_files` for Iceberg. Nothing is visible before that transaction, so a run
that dies leaves no half commit; files it had moved are deleted by the next
run (the Delta app transaction `vb_batch:<run>` / the Iceberg snapshot
property `vb.commit` tells whether the commit landed). Only the run holding the
output's lease recovers, so no run ever deletes the files of a commit in
flight. Partitioned tables are the exception: staged files hold rows of many
partitions, so they are streamed through the format's own writer
(`write_deltalake`, pyiceberg's data-file writer), which splits them; that
rewrites the rows once.

Metadata: Delta keeps Arrow field metadata (`vb.kind`, `vb.unit`, `vb.scale`,
`vb.legend`, ...) in its schema; the job-level keys (`vb.job`, `vb.run_id`,
...) go into each commit's info. Iceberg has no field metadata: every map
column's metadata is the table property `vb.column.<name>` (JSON), and the
job-level keys are table properties set in the same transaction as the data.
`open_delta` / `open_iceberg` (`vb_batch.io.tables`) put both back on the Arrow schema, so readers
see the same schema as for a Parquet output.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from vb_batch.config import ConfigError
from vb_batch.io.sinks.base import Sink
from vb_batch.io.sinks.metadata import MARKER, META_DIR, data_fingerprint, read_json, write_atomic
from vb_batch.io.sinks.staging import is_part_name

log = logging.getLogger(__name__)


class TableSink(Sink):
    """Staging and writing as the Parquet sink; commits go through a table format's log.

    Subclasses say whether the table exists and has rows, read the committed
    ids, check a job fits the table (partitioning), and commit staged files.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.cfg.partition_by:
            if name not in self.schema.names:
                raise ConfigError(f"output.partition_by: column {name!r} is not in the output; columns: {self.schema.names}")
            typ = self.schema.field(name).type
            if not (pa.types.is_primitive(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                raise ConfigError(f"output.partition_by: column {name!r} has type {typ}; partition by plain columns")
        self._commits = 0

    # ---------------------------------------------------------------- format hooks
    def _exists(self) -> bool:
        raise NotImplementedError

    def _ensure_table(self) -> None:
        """Create the table when the format needs it before files are staged (Iceberg: its location)."""

    def _has_rows(self) -> bool:
        raise NotImplementedError

    def _written_by_vb_batch(self) -> bool:
        """Whether the existing table's own metadata says vb_batch wrote it (outputs of earlier versions)."""
        raise NotImplementedError

    def _check_table(self) -> None:
        """Raise `ConfigError` when this job's output does not fit the existing table (partitioning)."""

    def _table_dataset(self) -> pads.Dataset:
        """The existing table's current rows, its schema with vb_batch's field metadata."""
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
    def _state(self) -> dict[str, Any]:
        marker = read_json(self.fs, posixpath.join(self.meta, MARKER))
        if marker is not None and marker.get("format") not in (None, self.format):
            raise ConfigError(
                f"{self.describe()} holds a vb_batch {marker.get('format')} output, not a {self.format} table; "
                "use another output"
            )
        owned = marker is not None or (self._exists() and self._written_by_vb_batch())
        foreign = []
        if not owned:
            foreign = [posixpath.relpath(p, self.root) for p in self._listing() if self._top_level(p) != META_DIR]
        if self._exists() and self.cfg.mode != "overwrite":
            self._check_table()
        fingerprint = marker.get("fingerprint") if marker else None
        if fingerprint is None and owned and self._exists():
            # A table of an earlier vb_batch version, or whose marker was lost: its rows say what it holds.
            fingerprint = data_fingerprint(self._table_dataset())
        return {"foreign": foreign, "has_rows": self._has_rows(), "fingerprint": fingerprint}

    def lease_held(self):
        # The lease lives under the table's location, which an Iceberg table only has once it exists.
        self._ensure_table()
        return super().lease_held()

    def _recover(self) -> None:
        """Delete files that a dead run moved into the table but never committed; clear dead staging and
        temporary files."""
        for path in sorted(self.fs.glob(posixpath.join(self.meta, "intents", "*.json"))):
            record = read_json(self.fs, path) or {}
            key, files = record.get("key"), record.get("files")
            if not (isinstance(key, str) and key.rpartition("-")[2].isdigit() and isinstance(files, list)):
                if record:
                    log.warning("ignoring intent %s: not vb_batch's record", path)
            elif not self._is_committed(key):
                for moved in files:
                    if not isinstance(moved, str) or moved != self._data_path(posixpath.basename(moved)) \
                            or not is_part_name(posixpath.basename(moved)):
                        # Only part files in the table's own data folder can have been moved there by vb_batch.
                        log.warning("ignoring %s in intent %s: not vb_batch's part file of this table", moved, path)
                        continue
                    if self.fs.exists(moved):
                        log.warning("removing %s: moved into the table by a run that died before committing it", moved)
                        self.fs.rm(moved)
            self.fs.rm(path)
        self._clear_staging()
        self._clear_temporary_files()

    def _clear(self) -> None:
        """Overwrite happens in the table's log: the run's first commit replaces the table's rows."""

    def _commit_files(self, names: list[str]) -> None:
        mode = "overwrite" if self.cfg.mode == "overwrite" and self._commits == 0 else "append"
        key = f"{self.run_id}-{self._commits:05d}"
        staged = [self._staged_path(name) for name in names]
        targets = [self._data_path(name) for name in names]
        if self.cfg.partition_by:
            self._commit_rewritten(staged, mode, key)
        elif staged == targets:  # staged where the table's data lives (Iceberg): nothing to move, no intent
            self._commit_added(targets, mode, key)
        else:
            record_path = posixpath.join(self.meta, "intents", f"{key}.json")
            write_atomic(self.fs, record_path, json.dumps({"key": key, "files": targets}).encode())
            for directory in {posixpath.dirname(t) for t in targets}:
                self.fs.makedirs(directory, exist_ok=True)
            for source, target in zip(staged, targets):
                self.fs.mv(source, target)
            self._commit_added(targets, mode, key)
            self.fs.rm(record_path)
        self._commits += 1

    def _finish(self, success: bool) -> None:
        """A run that finished without rows still creates (or, overwriting, empties) the table."""
        if success and self._commits == 0 and (self.cfg.mode == "overwrite" or not self._exists()):
            if self.lease is not None:
                self.lease.check()
            self._commit_files([])
