"""The driver half of every sink: one protocol, the rules that keep everything else safe.

Every sink (Parquet, Delta, Iceberg) has one protocol, used by every engine through the run core:

    sink.check()               read-only: refuse an output that is not ours, a mode that forbids
                               writing, a resume with another job's columns, a link inside the
                               output (fail fast)
    with sink.lease_held():    one writer per output (`vb_batch.io.lease`)
        done = sink.open()     recover a crashed run, apply the mode; the ids already committed
        sink.write(batch)      rows written by this process (the worker half: `sinks.staging.PartWriter`)
        sink.staging + sink.stage(name, rows)
                               a complete part file another process wrote into `staging` with
                               `sinks.staging.StagedParts` (Ray tasks, Spark executors) counts towards a commit
        sink.position = p      the run went through its whole input: record where it stood (close, last)
        sink.commit()          make staged rows visible atomically (also every `output.commit_every` rows,
                               and once `output.commit_every_s` seconds passed since the last commit)
        sink.close(success, summary)

Ownership. A sink deletes or moves only files it can prove are its own: files
under `_vb/`, and data files named by its own commit records (plain
`part-*.parquet` names: a record that names anything else, `../x` or an
absolute path, is not vb_batch's and is ignored). Every such path must be a
real file or folder inside the output: a symbolic link (or a second hard link)
there is refused before anything is touched (`sinks.paths`). An output that is
a file is refused. An output folder holds `_vb/output.json` (the job
fingerprint: columns, their `vb.*` meanings, model, profile); a folder that
holds anything vb_batch did not write for this output is refused unless
`output.allow_foreign_files` is set, and even then those files are never
touched. `append` and `resume` refuse an output written with another
fingerprint, listing what differs.

Crash safety. Every metadata file is written whole or not at all
(`sinks.metadata.write_atomic`). A commit writes its record first, then makes
the staged files visible: a crash between the two is rolled forward (Parquet)
or undone (lake tables) by the next run. A record that cannot be read was
never acted on (its files are still staged) and is dropped with a warning. A
run removes only its own staging when it ends: one that lost its lease never
touches the new holder's work. `_SUCCESS` is removed when a run starts and
written when it ends well: a failed run never leaves a dataset that looks complete.

Fencing. The lease check before each commit is not enough on its own: a holder
can pause (GC, SIGSTOP, a slow host) between its check and its commit while
another run takes the output over. So the format's own log is the fence: every
commit carries the writer's epoch (one more than the highest the log held when
the run opened) and lands only if the log still holds the epoch this run expects
at the exact version it commits (Delta: the app transaction `vb_batch.writer`,
committed with the library's retries off; Parquet: the epoch in each commit
record, where a record below the epoch of a record at the same or an earlier
sequence number is stale and ignored). A run that took the lease over commits
its epoch first (`_fence`, before `_recover`): from then on the run it replaced
can add nothing, so what that run moved or staged can never be committed, and
recovery may remove it. The stale run stops with `LeaseLostError` ("lease lost")
at its next commit; a commit step that fails because the output changed hands
(its staged files gone) says so too.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from fsspec.implementations.local import LocalFileSystem

from vb_batch.config import ConfigError, OutputConfig
from vb_batch.errors import OutputExistsError
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem
from vb_batch.io.lease import LEASE_NAME, Lease, LeaseLostError
from vb_batch.io.sinks.metadata import (
    LATEST_RUN,
    MARKER,
    META_DIR,
    fingerprint_changes,
    marker_record,
    read_json,
    schema_fingerprint,
    write_atomic,
)
from vb_batch.io.sinks.paths import check_real_folder, check_real_paths
from vb_batch.io.sinks.staging import PartWriter
from vb_batch.timing import phase


class Sink:
    """Staging, commits, ownership, the lease and the run records; subclasses commit through their format.

    Format hooks: `_state()`, `_fence()`, `_recover()`, `_clear()`, `_commit_files(names)`,
    `_committed_dataset()`, `_retire_failed()`, `_finish(success)`, `input_position()`, `_commit_position(p)`.
    """

    format: ClassVar[str] = "parquet"
    # The format's own folders at the top of the output, as protected from links as `_vb/` (`sinks.paths`).
    table_dirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id",
                 fingerprint: dict[str, Any] | None = None, retry_failed: bool = False):
        self.cfg = cfg
        self.run_id = run_id
        self.schema = schema
        self.id_column = id_column
        self.fingerprint = fingerprint or schema_fingerprint(schema)
        self.retry_failed = retry_failed
        self._files: PartWriter | None = None  # this process's own part files, opened by the first write
        self._staged: list[str] = []
        self._staged_rows = 0
        self._last_commit = time.monotonic()  # the time rule's clock: the last commit, or the sink's start
        self.rows_written = 0
        self.files_committed: list[str] = []
        self.lease: Lease | None = None
        # Where the input stood, recorded by `close` after the last commit (`vb_batch.io.positions`): set by
        # the run core only when the run went through its whole input.
        self.position: dict[str, Any] | None = None
        self._closing = False  # the last commit is the one that carries `position` (where the format can)
        self._position_written = False
        self._use_location(cfg.path)

    def _use_location(self, url: str) -> None:
        """Where the output lives: its filesystems, `_vb/` and the staging directory (a URL workers can open)."""
        self.location = url
        self.fs, self.root = fsspec_filesystem(url, self.cfg.storage)
        self.arrow_fs, _ = arrow_filesystem(url, self.cfg.storage)
        self.meta = posixpath.join(self.root, META_DIR)
        self.staging = self.fs.unstrip_protocol(posixpath.join(self.meta, "staging", self.run_id))

    def describe(self) -> str:
        """The output in the user's words, for messages."""
        return f"output.path {self.cfg.path!r}"

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _staged_path(self, name: str, run_id: str | None = None) -> str:
        return posixpath.join(self.meta, "staging", run_id or self.run_id, name)

    # ---------------------------------------------------------------- before the run
    def check(self) -> None:
        """Refuse an output this run must not write (read-only; called again once the lease is held)."""
        if self.fs.isfile(self.root):
            raise ConfigError(f"{self.describe()} is a file; an output is a folder (or prefix): choose a new path")
        check_real_paths(self.fs, self.root, self.describe(), self.table_dirs)
        state = self._state()
        if state["foreign"] and not self.cfg.allow_foreign_files:
            shown = ", ".join(sorted(state["foreign"])[:5]) + (" ..." if len(state["foreign"]) > 5 else "")
            raise ConfigError(
                f"{self.describe()} holds {len(state['foreign'])} file(s) vb_batch did not write for this output "
                f"({shown}); choose an empty or new output, or set output.allow_foreign_files: true to write next "
                "to them (vb_batch never touches them)"
            )
        if self.cfg.mode == "error" and state["has_rows"]:
            raise OutputExistsError(
                f"{self.describe()} already holds data; set output.mode to overwrite, append or resume"
            )
        if self.cfg.mode in ("append", "resume") and state["fingerprint"]:
            changes = fingerprint_changes(state["fingerprint"], self.fingerprint)
            if changes:
                raise ConfigError(
                    f"output.mode {self.cfg.mode}: {self.describe()} was written by a different job, whose rows "
                    f"cannot share it with this one's: {'; '.join(changes)}. Write to a new output, or use "
                    "output.mode=overwrite to replace it"
                )
        if self.retry_failed and self.cfg.mode != "resume":
            raise ConfigError("run.retry_failed: only with output.mode: resume (it re-runs failed rows of an output)")

    @contextlib.contextmanager
    def lease_held(self) -> Iterator[Lease]:
        """Hold the output's writer lease: a second run on the same output fails fast, naming this one."""
        check_real_folder(self.fs, self.meta, self.describe())  # the lease is written under `_vb/`
        self.lease = Lease(self.fs, self.meta, self.location, self.run_id, self.cfg.lease_seconds, self.describe())
        with self.lease:
            yield self.lease

    def open(self, among: pa.Array | None = None) -> pa.Array | None:
        """Recover what a crashed run left, apply the mode; the ids already committed (resume), else None.

        `among`: only the committed ids among these (the input's pending ids), found by streaming the
        output's id column, so that what a resume holds grows with what is pending, not with the output.
        """
        self.check()
        self._fence()
        self._recover()
        self._last_commit = time.monotonic()  # the time rule counts from here, not from a slow model load
        if self.cfg.mode == "overwrite":
            self._clear()
        self._write_marker()
        if self.fs.exists(self._path("_SUCCESS")):
            self.fs.rm(self._path("_SUCCESS"))
        if self.cfg.mode != "resume":
            return None
        if self.retry_failed:
            self._retire_failed()
        return self._committed_ids(among)

    def committed_ids(self, among: pa.Array | None = None) -> pa.Array:
        """The ids of the committed rows (`among`: only those among these), by streaming the id column."""
        return self._committed_ids(among)

    def _committed_ids(self, among: pa.Array | None = None) -> pa.Array:
        id_type = self.schema.field(self.id_column).type
        values = among.drop_null().unique() if among is not None else None
        dataset = self._committed_dataset(values)
        if dataset is None:
            return pa.array([], id_type)
        if values is None:
            return dataset.to_table(columns=[self.id_column]).column(self.id_column).combine_chunks()
        try:
            values = values.cast(dataset.schema.field(self.id_column).type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError):  # ids of another type: every committed id
            return dataset.to_table(columns=[self.id_column]).column(self.id_column).combine_chunks()
        try:  # the filter prunes row groups by their id statistics: sequential ids read next to nothing
            batches = dataset.to_batches(columns=[self.id_column], batch_size=1 << 16,
                                         filter=pc.field(self.id_column).isin(values))
            found = [b.column(0) for b in batches]
        except pa.ArrowNotImplementedError:  # string views (delta-rs writes them): no kernel, compare as strings
            plain = pa.string() if pa.types.is_string_view(values.type) else values.type
            values = values.cast(plain)
            found = [ids.filter(pc.is_in(ids, value_set=values)) for ids in
                     (b.column(0).cast(plain) for b in dataset.to_batches(columns=[self.id_column],
                                                                          batch_size=1 << 16))]
        return pa.concat_arrays(found) if found else pa.array([], values.type)

    def _write_marker(self) -> None:
        marker = posixpath.join(self.meta, MARKER)
        if self.cfg.mode == "overwrite" or read_json(self.fs, marker) is None:
            write_atomic(self.fs, marker, marker_record(self.format, self.fingerprint, self.run_id, self.schema))

    def _marker_fingerprint(self) -> dict[str, Any] | None:
        marker = read_json(self.fs, posixpath.join(self.meta, MARKER))
        return marker.get("fingerprint") if marker else None

    def _listing(self) -> list[str]:
        """Every file under the output, as paths in `self.fs`."""
        try:
            return self.fs.find(self.root)
        except FileNotFoundError:  # object stores: a prefix without objects does not exist
            return []

    def _top_level(self, path: str) -> str:
        return posixpath.relpath(path, self.root).split("/", 1)[0]

    # ---------------------------------------------------------------- writing
    def write(self, batch: pa.RecordBatch) -> None:
        with phase("write"):
            self._write(batch)

    def _write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._files is None:
            self._files = PartWriter(self.schema, self.cfg, self.run_id, self.staging,
                                     lambda file: self.stage(file.name, file.rows))
        self._files.write(batch)
        if self.commit_due():  # the time rule: the open file is cut short and committed
            self.commit()

    def stage(self, name: str, rows: int) -> None:
        """Count a complete part file in `self.staging` towards the next commit.

        The sink's own files come here, and so do files another process wrote
        into `self.staging` with this sink's schema (`StagedParts` in Ray tasks, Spark executors):
        only files staged here are ever committed.
        """
        self._staged.append(name)
        self._staged_rows += rows
        self.rows_written += rows
        if (self.cfg.commit_every and self._staged_rows >= self.cfg.commit_every) or self.commit_due():
            self.commit()

    def commit_due(self) -> bool:
        """The time rule: `output.commit_every_s` seconds (on this process's monotonic clock) since the last commit.

        Checked as rows arrive (each written batch, each staged file), so a
        kill loses at most the rows of about that many seconds and one batch.
        """
        every = self.cfg.commit_every_s
        return bool(every) and time.monotonic() - self._last_commit >= every

    def commit(self) -> None:
        """Make every staged file visible atomically (see the module docstring)."""
        if self._files is not None:
            with phase("write"):
                self._files.close()
        if not self._staged:
            return
        with phase("commit"):
            self._commit_staged()

    def _commit_staged(self) -> None:
        if self.lease is not None:
            self.lease.check()  # a run that lost the output must not commit into it
        try:
            self._commit_files(self._staged)
        except LeaseLostError:
            raise
        except Exception:
            if self.lease is not None:
                self.lease.check()  # a commit step that failed because the output changed hands says so
            raise
        self.files_committed += self._staged
        self._staged, self._staged_rows = [], 0
        self._last_commit = time.monotonic()

    def close(self, success: bool, summary: dict[str, Any] | None = None) -> None:
        """Commit what was written (complete rows, also after a failure); the run record; success marks."""
        committed = False
        self._closing = True
        try:
            self.commit()
            committed = True
            self._finish(success)
            if self._position_due() is not None:  # no last commit carried it
                with phase("commit"):
                    self._commit_position(self.position)
                self._position_written = True
        finally:
            if self._files is not None:  # a failed commit: the open file stays uncommitted
                with contextlib.suppress(Exception):
                    self._files.abort()
            # A commit that failed half-way may have recorded files still in staging: the next run
            # (holding the lease) rolls it forward from there, so staging is kept for it.
            if committed:
                self.remove_own_staging()
            if summary is not None:
                self._write_run_record(summary)

    def remove_own_staging(self) -> None:
        """This run's staging folder, and `_vb/staging/` when left empty: only its own, since a run that
        lost its lease must not delete the new holder's."""
        staging = posixpath.join(self.meta, "staging")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(posixpath.join(staging, self.run_id), recursive=True)
        if isinstance(self.fs, LocalFileSystem):  # object stores have no empty folders to leave behind
            with contextlib.suppress(OSError):  # not empty: another run's staging
                os.rmdir(staging)

    def _write_run_record(self, record: dict[str, Any]) -> None:
        write_atomic(self.fs, posixpath.join(self.meta, "runs", f"{self.run_id}.json"),
                     json.dumps(record, indent=2, default=str).encode())
        self._point_to_latest_run(record)

    def _point_to_latest_run(self, record: dict[str, Any]) -> None:
        """`_vb/latest-run.json`: the run record a scheduler reads without listing `_vb/runs/`, written
        after the record itself; never by a run that lost the output to another (that one's stands)."""
        if self.lease is not None:
            try:
                self.lease.check()
            except LeaseLostError:
                return
        pointer = {"run_id": self.run_id, "record": f"{META_DIR}/runs/{self.run_id}.json",
                   "success": record.get("success"), "updated": time.time()}
        write_atomic(self.fs, posixpath.join(self.meta, LATEST_RUN), json.dumps(pointer, indent=2).encode())

    def update_run_record(self, changes: dict[str, Any]) -> None:
        """Rewrite this run's record with `changes` (the final times, the report) over what close wrote."""
        record = read_json(self.fs, posixpath.join(self.meta, "runs", f"{self.run_id}.json")) or {}
        self._write_run_record({**record, **changes})

    # ---------------------------------------------------------------- format hooks
    def _state(self) -> dict[str, Any]:
        """{"foreign": [paths], "has_rows": bool, "fingerprint": dict | None} of the output as it is."""
        raise NotImplementedError

    def _fence(self) -> None:
        """Take this run's writer epoch from the format's log; when the lease was taken over
        (`self.lease.taken_over_from`), commit it there before anything is recovered (see "Fencing")."""

    def _recover(self) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def _commit_files(self, names: list[str]) -> None:
        raise NotImplementedError

    def _committed_dataset(self, among: pa.Array | None = None) -> pads.Dataset | None:
        """The committed rows as a pyarrow dataset (None: none yet); `among`: it may leave out files that the
        format's own statistics (Delta's add actions, Iceberg's manifests) say hold none of these ids."""
        raise NotImplementedError

    def input_position(self) -> dict[str, Any] | None:
        """The newest input position in the output's log, None when there is none or a later commit removed
        rows (`vb_batch.io.positions`); read-only."""
        return None

    def _position_due(self) -> dict[str, Any] | None:
        """The input position, while the run's last commit (in `close`) has yet to record it."""
        due = self._closing and self.position is not None and not self._position_written
        return self.position if due else None

    def _commit_position(self, position: dict[str, Any]) -> None:
        """Record `position` in the output's log, after the run's last commit, fenced like a commit."""

    def _retire_failed(self) -> None:
        raise NotImplementedError

    def _finish(self, success: bool) -> None:
        """After the last commit of a run."""

    def _clear_staging(self) -> None:
        """Remove every run's staging: called with the lease held, so those runs are dead."""
        staging = posixpath.join(self.meta, "staging")
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def _clear_temporary_files(self) -> None:
        """Remove what `write_atomic` left when its process died before the rename (never read by anyone).

        `_vb/output.json.<x>.tmp` and `_vb/<records>/<name>.<x>.tmp`; a lease's temporary file is
        skipped: it may be a live contender's, about to be linked into place.
        """
        found = self.fs.glob(posixpath.join(self.meta, "*.tmp")) + self.fs.glob(posixpath.join(self.meta, "*", "*.tmp"))
        for temp in found:
            if not posixpath.basename(temp).startswith(LEASE_NAME):
                self.fs.rm(temp)
