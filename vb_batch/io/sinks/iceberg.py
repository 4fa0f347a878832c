"""The Iceberg sink: the table `output.table` in the catalog `output.catalog`, one snapshot per commit.

See `vb_batch.io.sinks.lake` for how commits land in the table's log: staged
files are added with `add_files` in a transaction that also sets vb_batch's
table properties (field metadata as `vb.column.<name>`, the job-level keys);
each snapshot's `vb.commit` property tells a recovering run whether a commit
landed. Catalogs and reading are in `vb_batch.io.tables.iceberg`.
"""

from __future__ import annotations

import itertools
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError
from vb_batch.io.filesystems import split_scheme
from vb_batch.io.sinks.lake import TableSink
from vb_batch.io.tables.arrow import job_metadata
from vb_batch.io.tables.iceberg import COLUMN_PROPERTY, iceberg_catalog, iceberg_location, iceberg_table, open_iceberg


class IcebergSink(TableSink):
    """An Iceberg table `output.table` in the catalog `output.catalog`, one snapshot per commit.

    The table is created on first use (identity partitions on
    `output.partition_by`); staging and run records live under its location.
    """

    format = "iceberg"
    table_dirs = ("data", "metadata")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.catalog = iceberg_catalog(self.cfg.catalog, self.cfg.storage)
        self.table = iceberg_table(self.catalog, self.cfg.table)
        if self.table is not None:
            self._use_location(iceberg_location(self.table))

    def describe(self) -> str:
        return f"output.table {self.cfg.table!r} (iceberg)"

    def __getstate__(self) -> dict[str, Any]:
        # Engines ship the sink's staging to workers; a catalog (a database connection) stays here.
        return {**self.__dict__, "catalog": None, "table": None}

    def _exists(self) -> bool:
        return self.table is not None

    def _has_rows(self) -> bool:
        snapshot = self.table.current_snapshot() if self.table is not None else None
        return snapshot is not None and int(snapshot.summary.get("total-records") or 0) > 0

    def _state(self) -> dict[str, Any]:
        if self.table is None:  # no table yet, so no location: nothing there to protect
            return {"foreign": [], "has_rows": False, "fingerprint": None}
        return super()._state()

    def _written_by_vb_batch(self) -> bool:
        return "vb.job" in self.table.properties

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

    def _committed_ids(self) -> pa.Array:
        table = self.table.scan(selected_fields=(self.id_column,)).to_arrow()
        return table.column(self.id_column).combine_chunks()

    def _retire_failed(self) -> None:
        """`run.retry_failed`: delete the failed rows in one snapshot (copy-on-write; the run then redoes them)."""
        from pyiceberg.expressions import NotNull

        if self._has_rows():
            self.table.delete(NotNull("vb_error.code"), snapshot_properties={"vb.commit": f"{self.run_id}-retire"})
            self.table = self.catalog.load_table(self.cfg.table)

    def _is_committed(self, key: str) -> bool:
        return self.table is not None and any(s.summary.get("vb.commit") == key for s in self.table.snapshots())

    def _data_path(self, name: str) -> str:
        return posixpath.join(self.root, "data", name)

    def _transaction(self, mode: str, key: str):
        """A transaction that carries this run's properties, and replaces the schema for an overwrite."""
        tx = self.table.transaction()
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
            tx.delete(AlwaysTrue(), snapshot_properties={"vb.commit": key})
            stale = [k for k in self.table.properties if k.startswith(COLUMN_PROPERTY)]
            if stale:
                tx.remove_properties(*stale)
        tx.set_properties(self._properties())
        return tx

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
