"""The Parquet sink: a Parquet dataset, made visible commit by commit through records under `_vb/`.

The Parquet dataset layout::

    out/part-<run>-<n>.parquet          committed data (what DuckDB, Spark, pyarrow read)
    out/_vb/output.json                 what this output is: format, fingerprint
    out/_vb/lease.json                  the writer lease of the run in progress
    out/_vb/staging/<run>/...           files being written (hidden: "_" prefix)
    out/_vb/commits/c<seq>-<run>.json   one record per commit: files it adds and removes (or the input
                                        position of a run that read its whole input: `io.positions`)
    out/_vb/runs/<run>.json             summary of a run
    out/_vb/latest-run.json             names the latest run's record (for schedulers)
    out/_SUCCESS                        written last by a run that finished

Commit records apply in sequence order; a record may add files, remove files
(an overwrite removes everything before it; `run.retry_failed` replaces the
files that hold failed rows), so the committed files are always the result of
replaying the records. `_SUCCESS` is removed when a run starts and written when
it ends well: a failed run never leaves a dataset that looks complete.

A record names only plain part-file names (`part-*.parquet`) and a run id as
its staging: one naming anything else (`../input`, an absolute path) was not
written by vb_batch, counts as damaged, and nothing it names is touched.

The fence (`vb_batch.io.sinks.base`, "Fencing"): every record carries its
writer's `epoch`, one more than the highest among the records when the run
opened (two more for a run taking the lease over: the run it replaced may not
have written a record of its epoch yet). A record whose epoch is below that of a record at the same or an
earlier sequence number is stale: written by a run that had lost the output,
it is ignored by every reader and removed by the next recovery. A run that took
the lease over first writes a record of its epoch alone (`fence`), at the next
sequence number; a run writes a record, then checks that it still holds the
lease, and only then moves files into place. So the one record a paused
holder can still write after a takeover either was seen (and rolled forward) by
the new holder's recovery, or shares its sequence number with the new holder's
fence record and is stale: its files never become visible.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.positions import COMPACTION, OPERATION_KEY, decode_position
from vb_batch.io.sinks.base import Sink
from vb_batch.io.sinks.metadata import (
    META_DIR,
    OWN_FILES,
    data_fingerprint,
    read_json,
    write_atomic,
)
from vb_batch.io.sinks.staging import is_part_name, part_file_name

log = logging.getLogger(__name__)


class ParquetSink(Sink):
    """A Parquet dataset at `output.path` (local or any fsspec URL): staged files, commit records, `_SUCCESS`."""

    format = "parquet"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next_record = 0
        self._epoch = 1  # this run's writer epoch (`_fence`)

    # ---------------------------------------------------------------- records
    def _records(self) -> list[tuple[str, dict[str, Any] | None]]:
        return commit_records(self.fs, self.meta)

    def committed_files(self) -> list[str]:
        """Data files the records make visible, by name, in commit order."""
        return visible_files(self._records())

    def _state(self) -> dict[str, Any]:
        records = self._records()
        committed = set(visible_files(records))
        # Files a record removes are ours too: a crash between a record that removes files (an overwrite's
        # reset, retry_failed's rewrite) and their removal leaves them, and the next run removes them.
        named = committed | {name for _, record in records if record for name in record.get("removes", [])}
        foreign = []
        for path in self._listing():
            top = self._top_level(path)
            if top == META_DIR or top in OWN_FILES or top in named or top.startswith("."):
                continue
            foreign.append(posixpath.relpath(path, self.root))
        fingerprint = self._marker_fingerprint()
        if fingerprint is None and committed:
            # An output of an earlier vb_batch version (or whose marker was lost): its files say what it holds.
            first = self._path(next(iter(committed)))
            if self.fs.exists(first):
                fingerprint = data_fingerprint(pads.dataset([first], format="parquet", filesystem=self.arrow_fs))
        return {"foreign": foreign, "has_rows": bool(committed), "fingerprint": fingerprint}

    def _fence(self) -> None:
        records = self._records()
        taking_over = self.lease is not None and self.lease.taken_over_from is not None
        # The run replaced took 1 + the highest epoch when it opened, and may have written no record since:
        # a run taking over goes one further, so that the replaced run's epoch is always below its own.
        highest = max((_epoch(record) for _, record in records if record), default=0)
        self._epoch = highest + (2 if taking_over else 1)
        self._next_record = 1 + max((_record_seq(p) for p, _ in records), default=-1)
        if taking_over:
            # The run replaced may be paused before its next record: from this one on, its records are stale.
            self._write_record({"files": [], "fence": True})

    def _recover(self) -> None:
        """Roll interrupted commits forward; drop damaged and stale records (never acted on); clear dead staging."""
        missing = []
        for path, record in self._records():
            if record is None:
                log.warning("%s: removing damaged commit record %s, or one written after its run lost the output "
                            "(its files were never moved)", self.describe(), path)
                self.fs.rm(path)
                continue
            staging_run = record.get("staging", record.get("run_id"))
            for name in record.get("files", []):
                if not self.fs.exists(self._path(name)):
                    staged = self._staged_path(name, staging_run)
                    if self.fs.exists(staged):
                        log.warning("%s: rolling forward interrupted commit of %s", self.describe(), name)
                        try:
                            self.fs.mv(staged, self._path(name))
                        except FileNotFoundError:  # its writer, paused until now, moved it in the meantime
                            if not self.fs.exists(self._path(name)):
                                missing.append(name)
                    else:
                        missing.append(name)
            for name in record.get("removes", []):
                if self.fs.exists(self._path(name)):
                    self.fs.rm(self._path(name))
        if missing:
            gone = [name for name in missing if name in self.committed_files()]
            if gone:
                log.warning("%s: committed file(s) %s are missing (deleted outside vb_batch?); their rows are no "
                            "longer in the output, and a resume processes them again", self.describe(), gone)
                self._write_record({"files": [], "removes": gone})
        self._clear_staging()
        self._clear_temporary_files()

    def _write_record(self, record: dict[str, Any]) -> None:
        """Write the next commit record; then make sure it is not stale before anything acts on it."""
        record = {"run_id": self.run_id, "staging": self.run_id, "time": time.time(), "epoch": self._epoch, **record}
        name = f"c{self._next_record:012d}-{self.run_id}.json"
        self._next_record += 1
        write_atomic(self.fs, posixpath.join(self.meta, "commits", name), json.dumps(record).encode())
        if self.lease is not None:
            # Still the holder once the record exists: a later holder's recovery sees it. Otherwise it
            # may be stale, and its files must stay where they are (see the module docstring).
            self.lease.check()

    def _apply(self, files: list[str], removes: list[str]) -> None:
        for name in files:
            self.fs.mv(self._staged_path(name), self._path(name))
        for name in removes:
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name))

    def _commit_files(self, names: list[str]) -> None:
        position = self._position_due()
        self._write_record({"files": list(names), "rows": self._staged_rows,
                            **({"position": position} if position is not None else {})})
        self._position_written = position is not None
        self._apply(names, [])

    def _clear(self) -> None:
        """Overwrite: one record removes every committed file (so a crash mid-way rolls forward), then history goes."""
        committed = self.committed_files()
        records = [p for p, _ in self._records()]
        self._write_record({"files": [], "removes": committed, "reset": True})
        self._apply([], committed)
        for path in records:
            self.fs.rm(path)
        for name in ("_report.html", "_metrics.parquet"):
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name))

    def _committed_dataset(self, among: pa.Array | None = None) -> pads.Dataset | None:
        files = [self._path(f) for f in self.committed_files()]
        return pads.dataset(files, format="parquet", filesystem=self.arrow_fs) if files else None

    def input_position(self) -> dict[str, Any] | None:
        """The newest record's `position`, unless a later record removed rows (compaction's records move them)."""
        position = None
        for _, record in self._records():
            if record is None:
                continue
            if record.get("position") is not None:
                position = record["position"]
            elif record.get("reset") or (record.get("removes") and record.get(OPERATION_KEY) != COMPACTION):
                position = None
        return decode_position(position)

    def _commit_position(self, position: dict[str, Any]) -> None:
        self._write_record({"files": [], "position": position})

    def _retire_failed(self) -> None:
        """`run.retry_failed`: rewrite the files that hold failed rows without them, in one commit."""
        rewritten, removed, kept_rows = [], [], 0
        for n, name in enumerate(self.committed_files()):
            path = self._path(name)
            errors = pq.read_table(path, columns=[ERROR_COLUMN], filesystem=self.arrow_fs).column(ERROR_COLUMN)
            if errors.null_count == len(errors):
                continue
            table = pq.read_table(path, filesystem=self.arrow_fs)
            ok = table.filter(pc.is_null(table.column(ERROR_COLUMN)))
            removed.append(name)
            if ok.num_rows:
                new = part_file_name(self.run_id, f"kept{n:05d}")
                staged = self._staged_path(new)
                self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
                pq.write_table(ok, staged, filesystem=self.arrow_fs, compression=self.cfg.compression)
                rewritten.append(new)
                kept_rows += ok.num_rows
        if removed:
            log.info("%s: re-running the failed rows of %d file(s)", self.describe(), len(removed))
            self._write_record({"files": rewritten, "removes": removed, "rows": kept_rows})
            self._apply(rewritten, removed)

    def _finish(self, success: bool) -> None:
        if success:
            if self.lease is not None:
                self.lease.check()  # a run that lost the output must not mark the new holder's work complete
            write_atomic(self.fs, self._path("_SUCCESS"), b"")


def commit_records(fs, meta: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(path, record or None when damaged) of every commit record under `meta`, in commit order.

    A record is vb_batch's only if every file it names is a part file of this output (a plain
    `part-*.parquet` name) and its staging is a run id: one naming anything else (`../input`, an
    absolute path) was not written by vb_batch, counts as damaged, and nothing it names is touched.
    """
    paths = fs.glob(posixpath.join(meta, "commits", "*.json"))

    def order(path: str) -> tuple[int, str]:
        name = posixpath.basename(path)
        # Records of earlier versions (`<run>-<n>.json`) come before numbered ones (`c<seq>-<run>.json`).
        return (1, name) if name.startswith("c") else (0, name)

    records = []
    for path in sorted(paths, key=order):
        record = read_json(fs, path)
        if record is not None and not _names_own_files(record):
            log.warning("ignoring commit record %s: it names files that are not vb_batch's part files of this "
                        "output (not vb_batch's record)", path)
            record = None
        records.append((path, record))
    return _without_stale(records)


def _without_stale(records: list[tuple[str, dict[str, Any] | None]]) -> list[tuple[str, dict[str, Any] | None]]:
    """`records` with each stale one (an epoch below a record's at the same or an earlier sequence) as None."""
    highest: dict[int, int] = {}  # sequence number -> the highest epoch at it or before it
    for path, record in records:
        seq = _record_seq(path)
        highest[seq] = max(highest.get(seq, 0), _epoch(record) if record else 0)
    running = 0
    for seq in sorted(highest):
        running = highest[seq] = max(running, highest[seq])
    fresh = []
    for path, record in records:
        if record is not None and _epoch(record) < highest[_record_seq(path)]:
            log.warning("ignoring commit record %s: written by a run that had lost the output to a later writer "
                        "(epoch %d < %d)", path, _epoch(record), highest[_record_seq(path)])
            record = None
        fresh.append((path, record))
    return fresh


def _epoch(record: dict[str, Any]) -> int:
    """A record's writer epoch (0 for records of versions before epochs, and for anything not a number)."""
    epoch = record.get("epoch", 0)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


def _names_own_files(record: dict[str, Any]) -> bool:
    files, removes = record.get("files", []), record.get("removes", [])
    staging = record.get("staging", record.get("run_id", ""))
    return (isinstance(files, list) and isinstance(removes, list) and all(is_part_name(n) for n in files + removes)
            and isinstance(staging, str) and posixpath.basename(staging) == staging and staging not in (".", ".."))


def visible_files(records: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """The data files that a sequence of commit records leaves visible, by name."""
    files: dict[str, None] = {}
    for _, record in records:
        if record is None:
            continue
        if record.get("reset"):
            files.clear()
        for name in record.get("removes", []):
            files.pop(name, None)
        files.update(dict.fromkeys(record.get("files", [])))
    return list(files)


def _record_seq(path: str) -> int:
    name = posixpath.basename(path)
    head = name[1:].split("-", 1)[0]
    return int(head) if name.startswith("c") and head.isdigit() else -1
