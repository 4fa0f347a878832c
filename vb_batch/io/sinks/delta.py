"""The Delta sink: a Delta table at `output.path`, one table version per commit (`deltalake`).

See `vb_batch.io.sinks.lake` for how commits land in the table's log: files
are added with `AddAction`s (stats taken from each file's Parquet footer),
each commit carries the app transaction `vb_batch:<run>` at its sequence
number (how a recovering run tells whether a commit landed), and the job-level
`vb.*` keys in its commit info. The table is read through `vb_batch.io.tables.delta`.

The fence (`vb_batch.io.sinks.base`, "Fencing") is the app transaction
`vb_batch.writer`, whose version is the epoch of the output's writer. A run
takes epoch = the log's + 1 when it opens; each of its commits (data, the
deletes of `run.retry_failed`) reads the table at some version, checks that
the log there still holds the epoch the run expects (the one it read, until its
own first commit sets its own), and commits against exactly that version with
delta-rs's automatic retries off. A commit that loses the race for the version
is checked again at the newer one, never retried blindly; a log whose epoch is
another run's stops this run with `LeaseLostError`. A run that took the lease
over, or that finds a commit in flight (an intent), commits its epoch at once,
alone (one table version with no data), before its recovery deletes the files
of the commit the old holder never finished.

Input positions (`vb_batch.io.positions`): a run that read its whole input ends with one more
commit, without data, whose info carries `vb.input-position`; any later commit that removes rows
(dataChange), other than compaction (`vb.operation: compact`, OPTIMIZE), voids it.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from urllib.parse import unquote
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import ConfigError
from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.filesystems import delta_storage_options, fsspec_filesystem
from vb_batch.io.lease import LeaseLostError
from vb_batch.io.positions import (
    COMPACTION,
    OPERATION_KEY,
    POSITION_KEY,
    decode_position,
    encode_position,
    may_hold,
)
from vb_batch.io.sinks.lake import TableSink
from vb_batch.io.tables.arrow import job_metadata, local_uri
from vb_batch.io.tables.delta import delta_job_metadata, delta_table, open_delta

DELTA_APP = "vb_batch:"  # app transaction ids of vb_batch's commits: `vb_batch:<run>`
WRITER_APP = "vb_batch.writer"  # the app transaction whose version is the writer's epoch: the fence
# Commits that lose the race for a table version to other writers' commits (compaction, a reader's
# maintenance) before this one gives up; each loss is checked against the fence, never retried blindly.
COMMIT_ATTEMPTS = 8
# Table versions read back (newest first) for the last input position before a run reads its whole input.
POSITION_SEARCH_VERSIONS = 1000

log = logging.getLogger(__name__)


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
        self._epoch_read: int | None = None  # the log's writer epoch when this run opened (None: never set)
        self._epoch = 1  # this run's writer epoch: the one read + 1
        self._epoch_committed = False  # whether the log carries this run's epoch (its first commit sets it)

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

    def _committed_dataset(self, among: pa.Array | None = None) -> pads.Dataset | None:
        table = self._table()
        if table is None:
            return None
        if among is None:
            return open_delta(self.cfg.path, self.cfg.storage, table=table)
        # The files whose id range (the add actions' stats) may hold one of `among`, read as plain Parquet.
        actions = pa.table(table.get_add_actions(flatten=True))
        low, high = f"min.{self.id_column}", f"max.{self.id_column}"
        paths = actions.column("path").to_pylist()
        if low in actions.column_names and high in actions.column_names:
            ordered = sorted(among.to_pylist())
            paths = [p for p, lo, hi in zip(paths, actions.column(low).to_pylist(), actions.column(high).to_pylist())
                     if may_hold(ordered, lo, hi)]
        if not paths:
            return None
        return pads.dataset([posixpath.join(self.root, unquote(p)) for p in paths], format="parquet",
                            filesystem=self.arrow_fs)

    def input_position(self) -> dict[str, Any] | None:
        """The newest commit info's `vb.input-position`, read back through the log's JSON commits, unless a
        later commit removed rows (an overwrite, a delete; compaction only moves them)."""
        table = self._table()
        if table is None:
            return None
        fs, root = fsspec_filesystem(self.cfg.path, self.cfg.storage)
        version = table.version()
        for v in range(version, max(-1, version - POSITION_SEARCH_VERSIONS), -1):
            try:
                with fs.open(posixpath.join(root, "_delta_log", f"{v:020d}.json"), "rb") as f:
                    actions = [json.loads(line) for line in f.read().splitlines() if line.strip()]
            except FileNotFoundError:  # expired by log retention: the position cannot be told
                return None
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
            if POSITION_KEY in info:
                return decode_position(info[POSITION_KEY])
            moved = info.get(OPERATION_KEY) == COMPACTION or info.get("operation") == "OPTIMIZE"
            if not moved and any((a.get("remove") or {}).get("dataChange", True) for a in actions if "remove" in a):
                return None
        return None

    def _commit_position(self, position: dict[str, Any]) -> None:
        if self._table() is None:
            return  # no table: nothing was written, so there is nothing a position could save a run from reading
        self._commit_fenced(  # `_commit_fenced` adds the position due to the commit's info
            lambda table, props: table.create_write_transaction([], mode="append", schema=table.schema(),
                                                                commit_properties=props), key=None)

    def _retire_failed(self) -> None:
        """`run.retry_failed`: delete the failed rows in one table version (the run then redoes them)."""
        table = self._table()
        if table is not None and table.file_uris():
            # A failed row's error has a code; delta-rs cannot test a whole struct column for null.
            # A delete that matches no row commits nothing (delta-rs): the log keeps the epoch it had.
            self._commit_fenced(lambda table, props: table.delete(f"`{ERROR_COLUMN}`.`code` IS NOT NULL",
                                                                  commit_properties=props)["num_deleted_rows"] > 0,
                                f"{self.run_id}-retire")

    # ---------------------------------------------------------------- the fence
    def _fence(self) -> None:
        table = self._table()
        self._epoch_read = table.transaction_version(WRITER_APP) if table is not None else None
        self._epoch = (self._epoch_read or 0) + 1
        # A run this one took the lease from, or whose commit is in flight (its intent is left: recovery
        # deletes its files), may be paused before its commit: from the fence's version on, it can add nothing.
        in_flight = self.fs.glob(posixpath.join(self.meta, "intents", "*.json"))
        if self.lease is not None and (self.lease.taken_over_from is not None or in_flight):
            self._commit_fenced(self._commit_epoch, key=None, taking_over=True)
            log.info("%s: writer epoch %d committed; no earlier writer (run %s) can add to the table any more",
                     self.describe(), self._epoch, self.lease.taken_over_from or "with a commit in flight")

    def _commit_epoch(self, table, props) -> None:
        """A commit of this run's epoch alone (no data): creates the table, partitioned as configured, when
        there is none."""
        from deltalake import Schema
        from deltalake.transaction import create_table_with_add_actions

        if table is None:
            create_table_with_add_actions(self.uri, Schema.from_arrow(self.schema), [], mode="error",
                                          partition_by=self.cfg.partition_by or None,
                                          storage_options=self.storage_options, commit_properties=props)
        else:
            table.create_write_transaction([], mode="append", schema=table.schema(), commit_properties=props)

    def _commit_fenced(self, commit: Callable[[Any, Any], Any], key: str | None, taking_over: bool = False,
                       info: dict[str, str] | None = None) -> None:
        """Run `commit(table, commit_properties)` against the table version just read, if the log there
        holds the writer epoch this run expects; a lost race for the version is checked again.

        `taking_over`: the fence commit of a run that holds the lease now; a commit the old holder
        landed meanwhile stays (this run reads the committed ids after), and the epoch moves past it.
        """
        from deltalake.exceptions import CommitFailedError, DeltaError

        for _ in range(COMMIT_ATTEMPTS):
            table = self._table()
            found = table.transaction_version(WRITER_APP) if table is not None else None
            if taking_over:
                self._epoch_read, self._epoch = found, (found or 0) + 1
            expected = self._epoch if self._epoch_committed else self._epoch_read
            if found != expected:
                self._fenced_off(found, expected)
            position = self._position_due()
            if position is not None:
                info = {**(info or {}), POSITION_KEY: encode_position(position)}
            try:
                landed = commit(table, self._commit_properties(key, info)) is not False
            except CommitFailedError:
                continue  # another commit took this version: check the fence at the newer one
            except DeltaError:
                if table is None and self._table() is not None:
                    continue  # another run created the table first
                raise
            if landed:  # `commit` returns False when it found nothing to commit
                self._epoch_committed = True
                self._position_written = self._position_written or position is not None
            return
        raise RuntimeError(f"{self.describe()}: {COMMIT_ATTEMPTS} commits in a row lost the race for the next "
                           "table version to other writers; committed rows are kept, re-run with output.mode=resume")

    def _fenced_off(self, found: int | None, expected: int | None) -> None:
        if self.lease is not None:
            self.lease.check()  # names the run that took the output over, when the lease says so
        raise LeaseLostError(
            f"{self.describe()}: lease lost: the table's writer epoch is {found}, not this run's {expected}: another "
            "run took this output over; this run commits nothing more (its committed rows are kept), re-run with "
            "output.mode=resume")

    def _is_committed(self, key: str) -> bool:
        run_id, seq = key.rsplit("-", 1)
        table = self._table()
        done = table.transaction_version(DELTA_APP + run_id) if table is not None else None
        return done is not None and done >= int(seq)

    def _commit_properties(self, key: str | None, info: dict[str, str] | None = None):
        """This run's epoch (the fence), the commit's sequence number when it has one, the job's keys (and
        `info`); retries off, so that a commit lands at the version whose fence was checked or not at all."""
        from deltalake.transaction import CommitProperties, Transaction

        transactions = [Transaction(WRITER_APP, self._epoch)]
        seq = key.rsplit("-", 1)[1] if key else ""
        if seq.isdigit():
            transactions.append(Transaction(self.app_id, int(seq)))
        return CommitProperties(custom_metadata={**job_metadata(self.schema), **(info or {})},
                                app_transactions=transactions,
                                max_commit_retries=0)

    def _commit_added(self, paths: list[str], mode: str, key: str) -> None:
        from deltalake import Schema
        from deltalake.transaction import AddAction, create_table_with_add_actions

        actions = []
        for path in paths:
            info = self.arrow_fs.get_file_info(path)
            meta = pq.read_metadata(path, filesystem=self.arrow_fs)
            actions.append(AddAction(posixpath.relpath(path, self.root), info.size, {}, int(time.time() * 1000), True,
                                     _delta_stats(meta)))

        def commit(table, props) -> None:
            if table is None:
                create_table_with_add_actions(self.uri, Schema.from_arrow(self.schema), actions, mode="error",
                                              storage_options=self.storage_options, commit_properties=props)
            else:
                table.create_write_transaction(actions, mode=mode, schema=self.schema, commit_properties=props)

        self._commit_fenced(commit, key)

    def _commit_rewritten(self, paths: list[str], mode: str, key: str) -> None:
        from deltalake import write_deltalake

        def commit(table, props) -> None:
            reader = pads.dataset(paths, schema=self.schema, format="parquet", filesystem=self.arrow_fs).scanner()
            # The table object pins the version whose fence was checked; a new table has none.
            target = {"table_or_uri": table} if table is not None else {"table_or_uri": self.uri,
                                                                        "storage_options": self.storage_options}
            write_deltalake(**target, data=reader.to_reader(), partition_by=self.cfg.partition_by, mode=mode,
                            schema_mode="overwrite" if mode == "overwrite" else None, commit_properties=props)

        self._commit_fenced(commit, key)
