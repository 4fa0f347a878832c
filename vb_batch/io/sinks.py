"""Sinks: where annotated rows go, and the rules that keep everything else safe. This module holds Parquet.

Every sink has one protocol, used by every engine through the run core:

    sink.check()               read-only: refuse an output that is not ours, a mode that forbids
                               writing, a resume with another job's columns (fail fast)
    with sink.lease_held():    one writer per output (`vb_batch.io.lease`)
        done = sink.open()     recover a crashed run, apply the mode; the ids already committed
        sink.write(batch)      rows written by this process (staged Parquet files)
        sink.staging + sink.stage(name, rows)
                               a complete part file another process wrote into `staging` with
                               `engines.base.StagedParts` (Ray tasks, Spark executors) counts towards a commit
        sink.commit()          make staged rows visible atomically (also every `output.commit_every` rows)
        sink.close(success, summary)

Ownership. A sink deletes or moves only files it can prove are its own: files
under `_vb/`, and data files named by its own commit records (plain
`part-*.parquet` names: a record that names anything else, `../x` or an
absolute path, is not vb_batch's and is ignored). An output that is a file is
refused. An output folder
holds `_vb/output.json` (the job fingerprint: columns, their `vb.*` meanings,
model, profile); a folder that holds anything vb_batch did not write for this
output is refused unless `output.allow_foreign_files` is set, and even then
those files are never touched. `append` and `resume` refuse an output written
with another fingerprint, listing what differs.

Crash safety. Every metadata file is written whole or not at all (local files:
temporary file, fsync, rename; object stores: one PUT). A commit writes its
record first, then moves the staged files into place: a crash between the two
is rolled forward by the next run. A record that cannot be read was never
acted on (its files are still staged) and is dropped with a warning. A run
removes only its own staging when it ends: one that lost its lease never
touches the new holder's work.

The Parquet dataset layout::

    out/part-<run>-<n>.parquet          committed data (what DuckDB, Spark, pyarrow read)
    out/_vb/output.json                 what this output is: format, fingerprint
    out/_vb/lease.json                  the writer lease of the run in progress
    out/_vb/staging/<run>/...           files being written (hidden: "_" prefix)
    out/_vb/commits/c<seq>-<run>.json   one record per commit: files it adds and removes
    out/_vb/runs/<run>.json             summary of a run
    out/_SUCCESS                        written last by a run that finished

Commit records apply in sequence order; a record may add files, remove files
(an overwrite removes everything before it; `run.retry_failed` replaces the
files that hold failed rows), so the committed files are always the result of
replaying the records. `_SUCCESS` is removed when a run starts and written when
it ends well: a failed run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from vb_batch._version import __version__
from vb_batch.config import ConfigError, OutputConfig
from vb_batch.errors import OutputExistsError
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem
from vb_batch.io.lease import LEASE_NAME, Lease, write_temp_file
from vb_batch.timing import phase

log = logging.getLogger(__name__)

META_DIR = "_vb"
MARKER = "output.json"
PART_RE = re.compile(r"^part-.*\.parquet$")
# What vb_batch itself keeps at the top of an output, besides data files and `_vb/`.
OWN_FILES = frozenset({"_SUCCESS", "_report.html", "_metrics.parquet"})
ERROR_COLUMN = "vb_error"


# ---------------------------------------------------------------------------- metadata files


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write `path` whole or not at all: a crash or a full disk never leaves a partial file."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: object stores show the whole object or none
        return
    temp = write_temp_file(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(posixpath.dirname(path), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def read_json(fs, path: str) -> dict[str, Any] | None:
    """A metadata record, or None (with a warning) when it is missing, empty or damaged."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
        record = json.loads(data)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        log.warning("ignoring damaged record %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------- the job fingerprint


def schema_fingerprint(schema: pa.Schema, model: str | None = None, profile: str | None = None) -> dict[str, Any]:
    """What must stay the same for rows of two runs to live in one output: columns, their meanings, the model."""
    meanings = {}
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items() if k.startswith(b"vb.")}
        if meta:
            meanings[f.name] = meta
    return {"columns": {f.name: str(_plain_type(f.type)) for f in schema}, "meanings": meanings, "model": model,
            "profile": profile}


def data_fingerprint(dataset: pads.Dataset) -> dict[str, Any]:
    """The fingerprint of rows already written, for an output without its marker (written by an earlier
    vb_batch version, or the marker was lost): the columns and meanings of its schema, and the model
    and profile that its first row names (`vb_model`, `vb_profile`)."""
    names = [name for name in ("vb_model", "vb_profile") if name in dataset.schema.names]
    rows = dataset.head(1, columns=names).to_pylist() if names else []
    first = rows[0] if rows else {}
    return schema_fingerprint(dataset.schema, first.get("vb_model"), first.get("vb_profile"))


def _plain_type(typ: pa.DataType) -> pa.DataType:
    """`typ` as vb_batch writes it, whatever a storage format made of it on the way back.

    A fingerprint read back from data (an output without its marker: Parquet files name list
    items "element", Iceberg returns large strings and binaries) must equal the job's own.
    """
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return pa.string()
    if pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ):
        return pa.binary()
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return pa.list_(typ.value_field.with_type(_plain_type(typ.value_type)).with_name("item"))
    if pa.types.is_struct(typ):
        return pa.struct([f.with_type(_plain_type(f.type)) for f in typ])
    return typ


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between an output's fingerprint and a job's, in words (empty: compatible)."""
    changes = []
    old_cols, new_cols = old.get("columns", {}), new.get("columns", {})
    if sorted(set(new_cols) - set(old_cols)):
        changes.append(f"columns only in this job: {sorted(set(new_cols) - set(old_cols))}")
    if sorted(set(old_cols) - set(new_cols)):
        changes.append(f"columns only in the output: {sorted(set(old_cols) - set(new_cols))}")
    for name in sorted(set(old_cols) & set(new_cols)):
        if old_cols[name] != new_cols[name]:
            changes.append(f"column {name!r}: type {old_cols[name]} in the output, {new_cols[name]} in this job")
        before, after = old.get("meanings", {}).get(name, {}), new.get("meanings", {}).get(name, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"column {name!r}: {key} {before.get(key)!r} in the output, {after.get(key)!r} in this job")
    for key in ("model", "profile"):
        if old.get(key) and new.get(key) and old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} in the output, {new[key]!r} in this job")
    return changes


# ---------------------------------------------------------------------------- the base sink


class Sink:
    """Staging, commits, ownership, the lease and the run records; subclasses commit through their format.

    Format hooks: `_state()`, `_recover()`, `_clear()`, `_commit_files(names)`,
    `_committed_ids()`, `_retire_failed()`, `_finish(success)`.
    """

    format: ClassVar[str] = "parquet"

    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id",
                 fingerprint: dict[str, Any] | None = None, retry_failed: bool = False):
        self.cfg = cfg
        self.run_id = run_id
        self.schema = schema
        self.id_column = id_column
        self.fingerprint = fingerprint or schema_fingerprint(schema)
        self.retry_failed = retry_failed
        self._writer: pq.ParquetWriter | None = None
        self._writer_rows = 0
        self._seq = 0
        self._staged: list[str] = []
        self._staged_rows = 0
        self.rows_written = 0
        self.files_committed: list[str] = []
        self.lease: Lease | None = None
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
        self.lease = Lease(self.fs, self.meta, self.location, self.run_id, self.cfg.lease_seconds, self.describe())
        with self.lease:
            yield self.lease

    def open(self) -> pa.Array | None:
        """Recover what a crashed run left, apply the mode; the ids already committed (resume), else None."""
        self.check()
        self._recover()
        if self.cfg.mode == "overwrite":
            self._clear()
        self._write_marker()
        if self.fs.exists(self._path("_SUCCESS")):
            self.fs.rm(self._path("_SUCCESS"))
        if self.cfg.mode != "resume":
            return None
        if self.retry_failed:
            self._retire_failed()
        return self._committed_ids()

    def _write_marker(self) -> None:
        marker = posixpath.join(self.meta, MARKER)
        if self.cfg.mode == "overwrite" or read_json(self.fs, marker) is None:
            # The schema too (Arrow IPC, base64): readers of an output without rows yet still get its columns.
            record = {"vb_batch": __version__, "format": self.format, "fingerprint": self.fingerprint,
                      "run_id": self.run_id, "time": time.time(),
                      "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode()}
            write_atomic(self.fs, marker, json.dumps(record, indent=2).encode())

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
        if batch.schema != self.schema:
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                self._open_file()
            take = min(batch.num_rows - start, self.cfg.rows_per_file - self._writer_rows)
            self._writer.write_batch(batch.slice(start, take))
            self._writer_rows += take
            start += take
            if self._writer_rows >= self.cfg.rows_per_file:
                self._close_file()

    def _open_file(self) -> None:
        name = part_file_name(self.run_id, f"{self._seq:05d}")
        self._seq += 1
        path = self._staged_path(name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._writer = pq.ParquetWriter(path, self.schema, filesystem=self.arrow_fs, compression=self.cfg.compression)
        self._writer_name = name
        self._writer_rows = 0

    def _close_file(self) -> None:
        self._writer.close()
        self._writer = None
        self.stage(self._writer_name, self._writer_rows)

    def stage(self, name: str, rows: int) -> None:
        """Count a complete part file in `self.staging` towards the next commit.

        The sink's own files come here, and so do files another process wrote
        into `self.staging` with this sink's schema (Ray tasks, Spark executors):
        only files staged here are ever committed.
        """
        self._staged.append(name)
        self._staged_rows += rows
        self.rows_written += rows
        if self.cfg.commit_every and self._staged_rows >= self.cfg.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make every staged file visible atomically (see the module docstring)."""
        if self._writer is not None:
            with phase("write"):
                self._close_file()
        if not self._staged:
            return
        with phase("commit"):
            self._commit_staged()

    def _commit_staged(self) -> None:
        if self.lease is not None:
            self.lease.check()  # a run that lost the output must not commit into it
        self._commit_files(self._staged)
        self.files_committed += self._staged
        self._staged, self._staged_rows = [], 0

    def close(self, success: bool, summary: dict[str, Any] | None = None) -> None:
        """Commit what was written (complete rows, also after a failure); the run record; success marks."""
        try:
            self.commit()
            self._finish(success)
        finally:
            if self._writer is not None:  # a failed commit: the open file stays uncommitted
                with contextlib.suppress(Exception):
                    self._writer.close()
                self._writer = None
            # Only this run's own staging: a run that lost its lease must not delete the new holder's.
            staging = posixpath.join(self.meta, "staging")
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(posixpath.join(staging, self.run_id), recursive=True)
            if isinstance(self.fs, LocalFileSystem):  # object stores have no empty folders to leave behind
                with contextlib.suppress(OSError):  # not empty: another run's staging
                    os.rmdir(staging)
            if summary is not None:
                self._write_run_record(summary)

    def _write_run_record(self, record: dict[str, Any]) -> None:
        write_atomic(self.fs, posixpath.join(self.meta, "runs", f"{self.run_id}.json"),
                     json.dumps(record, indent=2, default=str).encode())

    def update_run_record(self, changes: dict[str, Any]) -> None:
        """Rewrite this run's record with `changes` (the final times, the report) over what close wrote."""
        record = read_json(self.fs, posixpath.join(self.meta, "runs", f"{self.run_id}.json")) or {}
        self._write_run_record({**record, **changes})

    # ---------------------------------------------------------------- format hooks
    def _state(self) -> dict[str, Any]:
        """{"foreign": [paths], "has_rows": bool, "fingerprint": dict | None} of the output as it is."""
        raise NotImplementedError

    def _recover(self) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def _commit_files(self, names: list[str]) -> None:
        raise NotImplementedError

    def _committed_ids(self) -> pa.Array:
        raise NotImplementedError

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


def part_file_name(run_id: str, tag: str) -> str:
    """`part-<run>-<tag>.parquet`: the one pattern of data files every engine writes."""
    return f"part-{run_id}-{tag}.parquet"


# ---------------------------------------------------------------------------- Parquet


class ParquetSink(Sink):
    """A Parquet dataset at `output.path` (local or any fsspec URL): staged files, commit records, `_SUCCESS`."""

    format = "parquet"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next_record = 0

    # ---------------------------------------------------------------- records
    def _records(self) -> list[tuple[str, dict[str, Any] | None]]:
        return commit_records(self.fs, self.meta)

    def committed_files(self) -> list[str]:
        """Data files the records make visible, by name, in commit order."""
        return replay(self._records())

    def _state(self) -> dict[str, Any]:
        records = self._records()
        committed = set(replay(records))
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

    def _recover(self) -> None:
        """Roll interrupted commits forward; drop damaged records (never acted on); clear dead staging."""
        missing = []
        for path, record in self._records():
            if record is None:
                log.warning("%s: removing damaged commit record %s (its files were never moved)", self.describe(), path)
                self.fs.rm(path)
                continue
            staging_run = record.get("staging", record.get("run_id"))
            for name in record.get("files", []):
                if not self.fs.exists(self._path(name)):
                    staged = self._staged_path(name, staging_run)
                    if self.fs.exists(staged):
                        log.warning("%s: rolling forward interrupted commit of %s", self.describe(), name)
                        self.fs.mv(staged, self._path(name))
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
        records = self._records()
        self._next_record = 1 + max((_record_seq(p) for p, _ in records), default=-1)

    def _write_record(self, record: dict[str, Any]) -> None:
        record = {"run_id": self.run_id, "staging": self.run_id, "time": time.time(), **record}
        name = f"c{self._next_record:012d}-{self.run_id}.json"
        self._next_record += 1
        write_atomic(self.fs, posixpath.join(self.meta, "commits", name), json.dumps(record).encode())

    def _apply(self, files: list[str], removes: list[str]) -> None:
        for name in files:
            self.fs.mv(self._staged_path(name), self._path(name))
        for name in removes:
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name))

    def _commit_files(self, names: list[str]) -> None:
        self._write_record({"files": list(names), "rows": self._staged_rows})
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

    def _committed_ids(self) -> pa.Array:
        files = [self._path(f) for f in self.committed_files()]
        if not files:
            return pa.array([], self.schema.field(self.id_column).type)
        table = pads.dataset(files, format="parquet", filesystem=self.arrow_fs).to_table(columns=[self.id_column])
        return table.column(self.id_column).combine_chunks()

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
    return records


def is_part_name(name: Any) -> bool:
    """A data file name vb_batch writes: `part-*.parquet`, a plain name (no folder, no `..`)."""
    return isinstance(name, str) and bool(PART_RE.match(name)) and posixpath.basename(name) == name and "\\" not in name


def _names_own_files(record: dict[str, Any]) -> bool:
    files, removes = record.get("files", []), record.get("removes", [])
    staging = record.get("staging", record.get("run_id", ""))
    return (isinstance(files, list) and isinstance(removes, list) and all(is_part_name(n) for n in files + removes)
            and isinstance(staging, str) and posixpath.basename(staging) == staging and staging not in (".", ".."))


def replay(records: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
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


def marker_schema(fs, meta: str) -> pa.Schema | None:
    """The output schema an output's marker records (None for outputs of earlier versions)."""
    marker = read_json(fs, posixpath.join(meta, MARKER))
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(marker["schema"])))
    except (TypeError, KeyError, ValueError, pa.ArrowInvalid):
        return None
