"""The Iceberg sink: the table `output.table` in the catalog `output.catalog`, one snapshot per commit.

Nothing but data files is written into the table's location: a catalog-managed
table (a REST catalog over a table bucket: S3 Tables, SeaweedFS, Polaris-style
catalogs) takes no side files there. What vb_batch must remember lives in
Iceberg's own metadata, committed through the catalog:

    table property  vb.writer         the one-writer lease record (`vb_batch.io.lease`), renewed by
                                      property-only commits (`TableWriterRecord`)
    table property  vb.epoch          the writer epoch of the last vb_batch commit: the fence
    table property  vb.fingerprint    the job fingerprint (what `_vb/output.json` holds elsewhere)
    table property  vb.last-run       the last run's record (JSON); each snapshot's summary names its run
    table property  vb.column.<name>  a column's field metadata; the job-level keys (`vb.job`, ...)
    table property  vb.input-position where the input stood when a run that read all of it started, and
                                      the output's snapshot then (`vb_batch.io.positions`)
    snapshot summary vb.run_id, vb.commit (run and sequence: `<run>-<seq>`), vb.epoch

Staging. Part files are written straight into `<location>/data/` under names
unique to the run (`part-<run>-...`, `vb_batch.io.sinks.staging`): a table
bucket takes writes there, and a commit then moves nothing: `add_files` adds
them in one transaction (partitioned tables: pyiceberg's writer rewrites them
into partition files, and the staged parts are deleted). Until that commit
they are unreferenced, so invisible.

Fencing (`vb_batch.io.sinks.base`, "Fencing"). Every commit (data, the deletes
of `run.retry_failed`) loads the table, checks in that same metadata that
`vb.writer` is still this run's and `vb.epoch` the one this run expects (the
one it read when it opened, until its own first commit sets its own: read + 1),
and commits against it: a snapshot commit asserts `main` is still the snapshot
read (pyiceberg adds `assert-ref-snapshot-id`; SQL catalogs compare the whole
metadata), so a commit that raced another is refused, read again and checked
again, never retried blindly. A run that took the lease over commits its epoch
at once in an empty snapshot, before anything else: from then on the run it
replaced can add nothing (its next commit stops with `LeaseLostError`), so the
part files it staged and never committed are deleted. Part files of a run that
died without being taken over (its lease released) stay unreferenced: Iceberg's
orphan-file removal (S3 Tables' maintenance, Spark's `remove_orphan_files`)
takes them past its retention; no run deletes another live run's files.

Catalogs and reading are in `vb_batch.io.tables.iceberg`. (A little over 450 lines: the lease
record, the fence and the commits that check it are one contract, read together.)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError
from vb_batch.io.filesystems import split_scheme
from vb_batch.io.lease import Lease, LeaseLostError, parse_record
from vb_batch.io.positions import COMPACTION, OPERATION_KEY, POSITION_KEY, decode_position, encode_position
from vb_batch.io.sinks.lake import TableSink
from vb_batch.io.sinks.metadata import data_fingerprint
from vb_batch.io.tables.arrow import job_metadata
from vb_batch.io.tables.iceberg import COLUMN_PROPERTY, iceberg_catalog, iceberg_location, iceberg_table, open_iceberg

log = logging.getLogger(__name__)

WRITER_PROPERTY = "vb.writer"
EPOCH_PROPERTY = "vb.epoch"
FINGERPRINT_PROPERTY = "vb.fingerprint"
RUN_PROPERTY = "vb.last-run"
# Commits that lose the race for the table's next metadata to other commits (this run's own heartbeat on
# a SQL catalog, another engine's maintenance) before one gives up; each loss is read and checked again.
COMMIT_ATTEMPTS = 8
# Tables vb_batch creates keep a bounded history of metadata files: each lease heartbeat is a commit.
CREATED_TABLE_PROPERTIES = {"write.metadata.delete-after-commit.enabled": "true",
                            "write.metadata.previous-versions-max": "100"}
# Pending ids at most for which a resume's lookup prunes data files by their id bounds (an `In` filter).
PRUNE_IDS_AT_MOST = 100_000
PLAIN_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def _tag(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _property_commit(catalog, table, updates: tuple) -> None:
    """Commit `updates` (table properties) against `table` as read: the same table and `main` snapshot."""
    from pyiceberg.table.update import AssertRefSnapshotId, AssertTableUUID

    requirements = (AssertTableUUID(uuid=table.metadata.table_uuid),
                    AssertRefSnapshotId(ref="main", snapshot_id=table.metadata.current_snapshot_id))
    catalog.commit_table(table, requirements, updates)


class TableWriterRecord:
    """The writer lease record of `vb_batch.io.lease` as the table property `vb.writer`.

    Each change reads the table, compares the property with the tag the lease
    saw (a hash of its text), and commits the new value with requirements (the
    same table, the same `main` snapshot); a commit the catalog refuses is read
    and compared again. Requirements cannot assert a property's value, so each
    change is read back: of two that landed together the later holds and the
    earlier reports that it lost. The fence does not rest on this record alone:
    the writer epoch committed with the data does (see the module docstring).
    It has its own catalog connection: the lease's heartbeat thread uses it.
    """

    def __init__(self, catalog_properties: dict[str, Any], storage, table_name: str):
        self.catalog = iceberg_catalog(catalog_properties, storage)
        self.table_name = table_name
        self.path = f"the table property {WRITER_PROPERTY} of {table_name}"

    def read(self) -> tuple[bytes, str] | None:
        value = self.catalog.load_table(self.table_name).properties.get(WRITER_PROPERTY)
        return None if value is None else (value.encode(), _tag(value))

    def create(self, data: bytes) -> str | None:
        return self._swap(None, data.decode())

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._swap(tag, data.decode())

    def delete(self, tag: str) -> bool:
        return self._swap(tag, None) is not None

    def _swap(self, expected: str | None, value: str | None) -> str | None:
        """Set (None: remove) the record if it is still at tag `expected` (None: absent); the new tag
        ("" once removed), or None when it changed."""
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.table.update import RemovePropertiesUpdate, SetPropertiesUpdate

        for _ in range(COMMIT_ATTEMPTS):
            table = self.catalog.load_table(self.table_name)
            current = table.properties.get(WRITER_PROPERTY)
            if (None if current is None else _tag(current)) != expected:
                return None
            update = (RemovePropertiesUpdate(removals=[WRITER_PROPERTY]) if value is None
                      else SetPropertiesUpdate(updates={WRITER_PROPERTY: value}))
            try:
                _property_commit(self.catalog, table, (update,))
            except CommitFailedException:
                continue  # the table moved (a data commit, a heartbeat): compare again
            if self.catalog.load_table(self.table_name).properties.get(WRITER_PROPERTY) != value:
                return None  # another change landed right after this one
            return "" if value is None else _tag(value)
        raise OSError(f"{self.path}: {COMMIT_ATTEMPTS} commits in a row lost the race for the table's metadata")


class IcebergSink(TableSink):
    """An Iceberg table `output.table` in the catalog `output.catalog`, one snapshot per commit.

    The table is created on first use (identity partitions on
    `output.partition_by`); see the module docstring for where everything lives.
    """

    format = "iceberg"
    table_dirs = ("data", "metadata")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.catalog = iceberg_catalog(self.cfg.catalog, self.cfg.storage)
        self.table = iceberg_table(self.catalog, self.cfg.table)
        if self.table is not None:
            self._use_location(iceberg_location(self.table))
        self._epoch_read: int | None = None  # the table's writer epoch when this run opened
        self._epoch = 1  # this run's writer epoch: the one read + 1
        self._epoch_committed = False  # whether the table carries this run's epoch (its first commit sets it)

    def describe(self) -> str:
        return f"output.table {self.cfg.table!r} (iceberg)"

    def __getstate__(self) -> dict[str, Any]:
        # Engines ship the sink's staging to workers; a catalog (a database connection) stays here.
        return {**self.__dict__, "catalog": None, "table": None}

    def _use_location(self, url: str) -> None:
        super()._use_location(url)
        self.staging = self.fs.unstrip_protocol(posixpath.join(self.root, "data"))

    def _staged_path(self, name: str, run_id: str | None = None) -> str:
        return self._data_path(name)

    def _data_path(self, name: str) -> str:
        return posixpath.join(self.root, "data", name)

    # ---------------------------------------------------------------- the table as it is
    def _exists(self) -> bool:
        return self.table is not None

    def _has_rows(self) -> bool:
        snapshot = self.table.current_snapshot() if self.table is not None else None
        return snapshot is not None and int(snapshot.summary.get("total-records") or 0) > 0

    def _written_by_vb_batch(self) -> bool:
        return "vb.job" in self.table.properties

    def _state(self) -> dict[str, Any]:
        """What the table's metadata says; a table vb_batch did not write shows its data files as foreign."""
        if self.table is None:
            return {"foreign": [], "has_rows": False, "fingerprint": None}
        if not self._written_by_vb_batch():
            files = [posixpath.relpath(split_scheme(task.file.file_path)[1], self.root)
                     for task in self.table.scan().plan_files()]
            return {"foreign": files or [posixpath.basename(self.table.metadata_location)],
                    "has_rows": self._has_rows(), "fingerprint": None}
        if self.cfg.mode != "overwrite":
            self._check_table()
        recorded = self.table.properties.get(FINGERPRINT_PROPERTY)
        # A table of an earlier vb_batch version has no fingerprint property: its rows say what it holds.
        fingerprint = json.loads(recorded) if recorded else data_fingerprint(self._table_dataset())
        return {"foreign": [], "has_rows": self._has_rows(), "fingerprint": fingerprint}

    def _check_table(self) -> None:
        if self._partition_columns() != list(self.cfg.partition_by):
            raise ConfigError(
                f"output.partition_by: the Iceberg table is partitioned by {self._partition_columns()}, "
                f"not {self.cfg.partition_by}"
            )

    def _table_dataset(self) -> pads.Dataset:
        return open_iceberg(self.table, self.cfg.storage)

    def _partition_columns(self) -> list[str]:
        schema = self.table.schema()
        return [schema.find_column_name(f.source_id) for f in self.table.spec().fields]

    def _committed_dataset(self, among: pa.Array | None = None) -> pads.Dataset | None:
        if self.table is None or self.table.current_snapshot() is None:
            return None
        if among is None or len(among) > PRUNE_IDS_AT_MOST:
            return open_iceberg(self.table, self.cfg.storage)
        # The data files whose id bounds (the manifests') may hold one of `among`.
        from pyiceberg.expressions import In

        kept = In(self.id_column, set(among.to_pylist())) if len(among) else "false"
        tasks = list(self.table.scan(row_filter=kept).plan_files())
        if not tasks:
            return None
        return pads.dataset([split_scheme(t.file.file_path)[1] for t in tasks], format="parquet",
                            filesystem=self.arrow_fs)

    def input_position(self) -> dict[str, Any] | None:
        """The table property `vb.input-position`, unless a snapshot after the one it names removed rows
        (an overwrite, a delete; a compaction's snapshot says `vb.operation: compact`) or that snapshot is
        no longer in the table's history (expired: what happened since cannot be told)."""
        table = self.catalog.load_table(self.cfg.table) if self.table is not None else None
        position = decode_position(table.properties.get(POSITION_KEY)) if table is not None else None
        if position is None:
            return None
        at, snapshot = position.get("output_snapshot"), table.current_snapshot()
        while snapshot is not None and snapshot.snapshot_id != at:
            operation = getattr(snapshot.summary.operation, "value", str(snapshot.summary.operation))
            if operation in ("overwrite", "delete") and snapshot.summary.get(OPERATION_KEY) != COMPACTION:
                return None
            parent = snapshot.parent_snapshot_id
            snapshot = table.snapshot_by_id(parent) if parent is not None else None
        return position if snapshot is not None or at is None else None

    def _commit_position(self, position: dict[str, Any]) -> None:
        def build(tx) -> None:
            at = tx.table_metadata.current_snapshot_id
            tx.set_properties({POSITION_KEY: encode_position({**position, "output_snapshot": at})})

        self._commit_fenced(build, key=None)

    def _is_committed(self, key: str) -> bool:
        return self.table is not None and any(s.summary.get("vb.commit") == key for s in self.table.snapshots())

    # ---------------------------------------------------------------- the run
    def _ensure_table(self) -> None:
        if self.table is not None:
            return
        namespace = self.cfg.table.rsplit(".", 1)[0] if "." in self.cfg.table else None
        if namespace is None:
            raise ConfigError(f'output.table: {self.cfg.table!r} needs a namespace: "namespace.name"')
        self.catalog.create_namespace_if_not_exists(namespace)
        plain = pa.schema([f.remove_metadata() for f in self.schema])
        properties = {**CREATED_TABLE_PROPERTIES, **self._properties()}
        with self.catalog.create_table_transaction(self.cfg.table, schema=plain, properties=properties) as tx:
            if self.cfg.partition_by:
                with tx.update_spec() as spec:
                    for name in self.cfg.partition_by:
                        spec.add_identity(name)
        self.table = self.catalog.load_table(self.cfg.table)
        self._use_location(iceberg_location(self.table))

    @contextlib.contextmanager
    def lease_held(self) -> Iterator[Lease]:
        """Hold the writer lease as the table property `vb.writer` (nothing in the table's location)."""
        self._ensure_table()
        record = TableWriterRecord(self.cfg.catalog, self.cfg.storage, self.cfg.table)
        self.lease = Lease(None, "", self.location, self.run_id, self.cfg.lease_seconds, self.describe(), store=record)
        with self.lease:
            yield self.lease

    def open(self, among: pa.Array | None = None) -> pa.Array | None:
        """As `Sink.open`, all in the table's metadata: no marker, no `_SUCCESS`, no records to recover (the
        fingerprint lands with the first commit; an overwrite's first commit replaces the rows)."""
        self.check()
        self._fence()
        if self.cfg.mode != "resume":
            return None
        if self.retry_failed:
            self._retire_failed()
        return self._committed_ids(among)

    def _fence(self) -> None:
        self._epoch_read = self._epoch_in(self.table)
        self._epoch = (self._epoch_read or 0) + 1
        replaced = self.lease.taken_over_from if self.lease is not None else None
        if replaced is None:
            return
        # The run replaced may be paused before its commit: from this snapshot on, it can add nothing.
        self._commit_fenced(lambda tx: self._append(tx, {"vb.fenced_run": replaced}).commit(), key=None)
        log.info("%s: writer epoch %d committed; run %s can no longer add to the table", self.describe(),
                 self._epoch, replaced)
        self._remove_uncommitted_parts(replaced)

    def _remove_uncommitted_parts(self, run_id: str) -> None:
        """Delete the part files `run_id` staged in `data/` and never committed (after the fence it cannot)."""
        if not PLAIN_RUN_ID.fullmatch(run_id):
            return
        staged = self.fs.glob(posixpath.join(self.root, "data", f"part-{run_id}-*.parquet"))
        if not staged:
            return
        io = self.table.io
        referenced = {split_scheme(entry.data_file.file_path)[1]
                      for snapshot in self.table.snapshots() if snapshot.summary.get("vb.run_id") == run_id
                      for manifest in snapshot.manifests(io)
                      for entry in manifest.fetch_manifest_entry(io, discard_deleted=False)}
        for path in staged:
            if path not in referenced:
                log.warning("removing %s: staged by run %s, which was taken over before it committed it", path, run_id)
                self.fs.rm(path)

    def _retire_failed(self) -> None:
        """`run.retry_failed`: delete the failed rows in one snapshot (copy-on-write; the run then redoes them)."""
        from pyiceberg.expressions import NotNull

        key = f"{self.run_id}-retire"
        if self._has_rows():
            self._commit_fenced(lambda tx: tx.delete(NotNull("vb_error.code"),
                                                     snapshot_properties=self._snapshot_properties(key)), key)

    def _write_run_record(self, record: dict[str, Any]) -> None:
        """The run's record as the table property `vb.last-run`, while no other run holds the table."""
        self._set_run_property(lambda _: record)

    def update_run_record(self, changes: dict[str, Any]) -> None:
        self._set_run_property(lambda current: {**current, **changes})

    def _set_run_property(self, record: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.table.update import SetPropertiesUpdate

        if self.table is None:
            return
        for _ in range(COMMIT_ATTEMPTS):
            table = self.catalog.load_table(self.cfg.table)
            holder = parse_record(table.properties.get(WRITER_PROPERTY, "").encode())[0]
            if holder and holder.get("run_id") != self.run_id:
                log.info("%s: run %s holds the table now; this run's record is not written", self.describe(),
                         holder.get("run_id", "?"))
                return
            current = json.loads(table.properties.get(RUN_PROPERTY) or "{}")
            value = json.dumps(record(current if current.get("run_id") == self.run_id else {}), default=str)
            try:
                _property_commit(self.catalog, table, (SetPropertiesUpdate(updates={RUN_PROPERTY: value}),))
                return
            except CommitFailedException:
                continue

    # ---------------------------------------------------------------- commits
    def _epoch_in(self, table) -> int | None:
        value = table.properties.get(EPOCH_PROPERTY) if table is not None else None
        return int(value) if isinstance(value, str) and value.isdigit() else None

    def _snapshot_properties(self, key: str | None) -> dict[str, str]:
        props = {"vb.run_id": self.run_id, "vb.epoch": str(self._epoch)}
        return {**props, "vb.commit": key} if key is not None else props

    def _append(self, tx, extra: dict[str, str] | None = None, key: str | None = None):
        return tx.update_snapshot(snapshot_properties={**self._snapshot_properties(key), **(extra or {})}).fast_append()

    def _commit_fenced(self, build: Callable[[Any], None], key: str | None) -> None:
        """Commit what `build(transaction)` adds, on the table as the catalog holds it now, if this run is
        still its writer there (see the module docstring)."""
        from pyiceberg.exceptions import CommitFailedException

        for _ in range(COMMIT_ATTEMPTS):
            self.table = self.catalog.load_table(self.cfg.table)
            self._check_writer()
            if key is not None and self._is_committed(key):
                return  # it landed, though its answer was lost
            tx = self.table.transaction()
            build(tx)
            tx.set_properties({EPOCH_PROPERTY: str(self._epoch)})
            try:
                tx.commit_transaction()
            except CommitFailedException:
                continue  # another commit moved the table: check the fence again on the newer metadata
            self._epoch_committed = True
            return
        raise LeaseLostError(f"{self.describe()}: {COMMIT_ATTEMPTS} commits in a row lost the race for the table's "
                             "metadata to other writers; committed rows are kept, re-run with output.mode=resume")

    def _check_writer(self) -> None:
        """Raise `LeaseLostError` unless the metadata just loaded names this run as the table's writer."""
        if self.lease is None:
            return
        found = self._epoch_in(self.table)
        expected = self._epoch if self._epoch_committed else self._epoch_read
        holder = parse_record(self.table.properties.get(WRITER_PROPERTY, "").encode())[0]
        if holder.get("token") == self.lease.token and found == expected:
            return
        by = holder.get("run_id") or next((s.summary.get("vb.run_id") for s in reversed(self.table.snapshots())
                                           if s.summary.get("vb.epoch") == str(found)), None)
        raise LeaseLostError(
            f"{self.describe()}: lease lost: run {by or '?'} took the table over (its writer epoch is {found}, "
            f"this run's {expected}); this run commits nothing more (its committed rows are kept), re-run with "
            "output.mode=resume")

    def _properties(self) -> dict[str, str]:
        """Field and job metadata and the fingerprint as table properties (Iceberg has no field metadata)."""
        props = dict(job_metadata(self.schema))
        props[FINGERPRINT_PROPERTY] = json.dumps(self.fingerprint, sort_keys=True)
        for f in self.schema:
            meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
            if meta:
                props[COLUMN_PROPERTY + f.name] = json.dumps(meta, sort_keys=True)
        return props

    def _prepare(self, tx, mode: str, key: str) -> None:
        """This run's properties on `tx`; for an overwrite, the new schema and the old rows deleted."""
        if mode == "overwrite":
            from pyiceberg.expressions import AlwaysTrue

            current = {f.name for f in self.table.schema().fields}
            plain = pa.schema([f.remove_metadata() for f in self.schema])
            # Columns that go, or whose type changes (e.g. output.encoding png -> array turns binary into
            # a struct, which Iceberg cannot evolve): dropped first, then added back with the new type.
            gone = (current - set(plain.names)) | set(self._retyped_columns(plain))
            if gone:
                with tx.update_schema(allow_incompatible_changes=True) as update:
                    for name in sorted(gone):
                        update.delete_column(name)
            with tx.update_schema(allow_incompatible_changes=True) as update:
                update.union_by_name(plain)
            tx.delete(AlwaysTrue(), snapshot_properties=self._snapshot_properties(key))
            stale = [k for k in self.table.properties if k.startswith(COLUMN_PROPERTY)]
            if stale:
                tx.remove_properties(*stale)
        tx.set_properties(self._properties())

    def _retyped_columns(self, plain: pa.Schema) -> list[str]:
        """Columns of the table that `plain` gives another type (partition sources are kept)."""
        from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids, schema_to_pyarrow

        # Both sides through pyiceberg's own conversion, so that equal Iceberg types compare equal.
        old = schema_to_pyarrow(self.table.schema(), include_field_ids=False)
        new = schema_to_pyarrow(_pyarrow_to_schema_without_ids(plain), include_field_ids=False)
        return [f.name for f in new if f.name in old.names and f.name not in self.cfg.partition_by
                and old.field(f.name).type != f.type]

    def _commit_added(self, paths: list[str], mode: str, key: str) -> None:
        scheme = split_scheme(self.location)[0]
        urls = [f"{scheme}://{p}" for p in paths]

        def build(tx) -> None:
            self._prepare(tx, mode, key)
            if urls:
                # Names unique to the run, and `vb.commit` tells a commit that landed: pyiceberg's duplicate
                # check would read every data file entry of the table on each commit.
                tx.add_files(urls, snapshot_properties=self._snapshot_properties(key), check_duplicate_files=False)

        self._commit_fenced(build, key)

    def _commit_rewritten(self, paths: list[str], mode: str, key: str) -> None:
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        def build(tx) -> None:
            self._prepare(tx, mode, key)
            counter = itertools.count()
            with self._append(tx, key=key) as append:
                for path in paths:
                    rows = pq.read_table(path, filesystem=self.arrow_fs, schema=self.schema)
                    plain = rows.cast(pa.schema([f.remove_metadata() for f in rows.schema]))
                    for data_file in _dataframe_to_data_files(tx.table_metadata, df=plain, io=self.table.io,
                                                              write_uuid=append.commit_uuid, counter=counter):
                        append.append_data_file(data_file)

        self._commit_fenced(build, key)
        for path in paths:  # rewritten into partition files: the staged parts are this run's, and unreferenced
            self.fs.rm(path)
