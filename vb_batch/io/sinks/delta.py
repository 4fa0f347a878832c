"""The Delta sink: a Delta table at `output.path`, one table version per commit (`deltalake`).

See `vb_batch.io.sinks.lake` for how commits land in the table's log: files
are added with `AddAction`s (stats taken from each file's Parquet footer),
each commit carries the app transaction `vb_batch:<run>` at its sequence
number (how a recovering run tells whether a commit landed), and the job-level
`vb.*` keys in its commit info. The table is read through `vb_batch.io.tables.delta`.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError
from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.filesystems import delta_storage_options
from vb_batch.io.sinks.lake import TableSink
from vb_batch.io.tables.arrow import job_metadata, local_uri
from vb_batch.io.tables.delta import delta_job_metadata, delta_table, open_delta

DELTA_APP = "vb_batch:"  # app transaction ids of vb_batch's commits: `vb_batch:<run>`


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


class DeltaSink(TableSink):
    """A Delta table at `output.path` (local or object storage), one table version per commit.

    >>> cfg = {"input": {"path": "images/"}, "output": {"format": "delta", "path": "s3://lake/labels", "mode": "resume"}}
    >>> vb_batch.annotate(cfg)   # doctest: +SKIP
    """

    format = "delta"
    table_dirs = ("_delta_log",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uri = local_uri(self.cfg.path)
        self.storage_options = delta_storage_options(self.cfg.path, self.cfg.storage)
        self.app_id = DELTA_APP + self.run_id

    def describe(self) -> str:
        return f"output.path {self.cfg.path!r} (delta)"

    def _table(self):
        return delta_table(self.cfg.path, self.cfg.storage)

    def _exists(self) -> bool:
        return self._table() is not None

    def _has_rows(self) -> bool:
        table = self._table()
        return table is not None and bool(table.file_uris())

    def _written_by_vb_batch(self) -> bool:
        table = self._table()
        return bool(delta_job_metadata(self.cfg.path, self.cfg.storage, table.version()))

    def _check_table(self) -> None:
        table = self._table()
        if list(table.metadata().partition_columns) != list(self.cfg.partition_by):
            raise ConfigError(
                f"output.partition_by: the Delta table is partitioned by {table.metadata().partition_columns}, "
                f"not {self.cfg.partition_by}"
            )

    def _table_dataset(self) -> pads.Dataset:
        return open_delta(self.cfg.path, self.cfg.storage, vb_metadata=False)

    def _committed_ids(self) -> pa.Array:
        if not self._exists():
            return pa.array([], self.schema.field(self.id_column).type)
        table = open_delta(self.cfg.path, self.cfg.storage).to_table(columns=[self.id_column])
        return table.column(self.id_column).combine_chunks()

    def _retire_failed(self) -> None:
        """`run.retry_failed`: delete the failed rows in one table version (the run then redoes them)."""
        table = self._table()
        if table is not None and table.file_uris():
            # A failed row's error has a code; delta-rs cannot test a whole struct column for null.
            table.delete(f"`{ERROR_COLUMN}`.`code` IS NOT NULL",
                         commit_properties=self._commit_properties(f"{self.run_id}-retire"))

    def _is_committed(self, key: str) -> bool:
        run_id, seq = key.rsplit("-", 1)
        table = self._table()
        done = table.transaction_version(DELTA_APP + run_id) if table is not None else None
        return done is not None and done >= int(seq)

    def _commit_properties(self, key: str):
        from deltalake.transaction import CommitProperties, Transaction

        seq = key.rsplit("-", 1)[1]
        transactions = [Transaction(self.app_id, int(seq))] if seq.isdigit() else []
        return CommitProperties(custom_metadata=job_metadata(self.schema), app_transactions=transactions)

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
