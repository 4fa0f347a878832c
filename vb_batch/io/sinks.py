"""Sinks: where annotated rows go. `open_sink` picks one by `output.format`; this module holds Parquet.

Every sink has one protocol, used by every engine:

    sink.check_mode()          fail fast when output.mode forbids writing (changes nothing)
    done = sink.open()         apply the mode; the ids already committed (for `resume`)
    sink.write(batch)          rows written by this process (staged Parquet files)
    sink.staging + sink.stage(name, rows)
                               a complete part file that another process wrote into `staging`
                               with `write_part` (Ray tasks, Spark executors) counts towards a commit
    sink.commit()              make staged rows visible atomically (also every `output.commit_every` rows)
    sink.close(success, summary)

Delta and Iceberg sinks (`vb_batch.io.lake`) share the staging and commit
through their table logs; `vb_batch.io.outputs.open_output` reads any of the three back.

The Parquet dataset sink: staged files, commit records, `_SUCCESS` last, and the output modes.

Layout of an output dataset::

    out/part-<run>-<seq>.parquet     committed data (what DuckDB, Spark, pyarrow read)
    out/_vb/staging/<run>/...        files being written (hidden: "_" prefix)
    out/_vb/commits/<run>-<seq>.json one record per commit: the files it made visible
    out/_vb/runs/<run>.json          summary of a finished run
    out/_SUCCESS                     written last by a run that finished

A commit first writes its record, then moves the staged files into place. A
crash between the two is rolled forward by the next run (the files are in
staging, complete); part files that no record names are removed. So every
visible row belongs to exactly one commit, and `resume` skips exactly the ids
that were committed. `_SUCCESS` is removed when a run starts and written when
it ends well: a failed run never leaves a dataset that looks complete.
One writer per output at a time.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from vb_batch.config import OutputConfig
from vb_batch.errors import OutputExistsError
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^part-.*\.parquet$")
META_DIR = "_vb"


class ParquetSink:
    def __init__(self, cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id"):
        self.cfg = cfg
        self.run_id = run_id
        self.schema = schema
        self.id_column = id_column
        self.fs, self.root = fsspec_filesystem(cfg.path, cfg.storage)
        self.arrow_fs, _ = arrow_filesystem(cfg.path, cfg.storage)
        # Where part files are staged: a path in `self.fs` (a URL where the output is not at `cfg.path`).
        self.staging = posixpath.join(self.root, META_DIR, "staging", run_id)
        self._writer: pq.ParquetWriter | None = None
        self._writer_rows = 0
        self._seq = 0
        self._commit_seq = 0
        self._staged: list[str] = []
        self._staged_rows = 0
        self.rows_written = 0
        self.files_committed: list[str] = []

    # ------------------------------------------------------------------ paths
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _commit_records(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.fs.glob(self._path(META_DIR, "commits", "*.json"))):
            with self.fs.open(path, "rb") as f:
                records.append(json.loads(f.read()))
        return records

    def _write_bytes(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def committed_files(self) -> list[str]:
        return [f for r in self._commit_records() for f in r["files"]]

    # ------------------------------------------------------------------ open
    def check_mode(self) -> None:
        """Raise `OutputExistsError` when `output.mode: error` meets existing data; changes nothing."""
        if self.cfg.mode != "error" or not self.fs.exists(self.root):
            return
        has_data = any(PART_RE.match(posixpath.basename(p)) for p in self.fs.find(self.root))
        if has_data or self._commit_records():
            raise OutputExistsError(
                f"output.path {self.cfg.path!r} already holds data; set output.mode to overwrite, append or resume"
            )

    def open(self) -> set[Any]:
        """Apply the output mode; returns the ids already committed (used by `resume`)."""
        self.check_mode()
        if self.cfg.mode == "overwrite" and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)
        self._recover()
        if self.fs.exists(self._path("_SUCCESS")):
            self.fs.rm(self._path("_SUCCESS"))
        return self.committed_ids() if self.cfg.mode == "resume" else set()

    def _recover(self) -> None:
        """Finish commits a crash interrupted, drop files no commit names, clear dead staging."""
        named: set[str] = set()
        for record in self._commit_records():
            staged = self._path(META_DIR, "staging", record["run_id"])
            for name in record["files"]:
                named.add(name)
                if not self.fs.exists(self._path(name)):
                    src = posixpath.join(staged, name)
                    if not self.fs.exists(src):
                        raise RuntimeError(f"output {self.cfg.path!r}: committed file {name} is missing")
                    log.warning("rolling forward interrupted commit of %s", name)
                    self.fs.mv(src, self._path(name))
        try:
            listing = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:  # object stores: a prefix without objects does not exist
            listing = []
        for path in listing:
            name = posixpath.basename(path)
            if PART_RE.match(name) and name not in named:
                log.warning("removing %s: written by a run that crashed before committing it", name)
                self.fs.rm(path)
        staging_root = self._path(META_DIR, "staging")
        if self.fs.exists(staging_root):
            self.fs.rm(staging_root, recursive=True)

    def committed_ids(self) -> set[Any]:
        files = [self._path(f) for f in self.committed_files()]
        if not files:
            return set()
        table = pads.dataset(files, format="parquet", filesystem=self.arrow_fs).to_table(columns=[self.id_column])
        return set(table.column(self.id_column).to_pylist())

    # ------------------------------------------------------------------ write
    def write(self, batch: pa.RecordBatch) -> None:
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
        name = f"part-{self.run_id}-{self._seq:05d}.parquet"
        self._seq += 1
        self.fs.makedirs(self.staging, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self.fs._strip_protocol(posixpath.join(self.staging, name)), self.schema, filesystem=self.arrow_fs,
            compression=self.cfg.compression,
        )
        self._writer_name = name
        self._writer_rows = 0

    def _close_file(self) -> None:
        self._writer.close()
        self._writer = None
        self.stage(self._writer_name, self._writer_rows)

    def stage(self, name: str, rows: int) -> None:
        """Count a complete part file in `self.staging` towards the next commit.

        The sink's own files come here, and so do files another process wrote
        into `self.staging` with this sink's schema (the Ray engine's tasks):
        only files staged here are ever committed.
        """
        self._staged.append(name)
        self._staged_rows += rows
        self.rows_written += rows
        if self.cfg.commit_every and self._staged_rows >= self.cfg.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make every staged file visible: record first, then move (see the module docstring)."""
        if self._writer is not None:
            self._close_file()
        if not self._staged:
            return
        record = {"run_id": self.run_id, "files": self._staged, "rows": self._staged_rows, "time": time.time()}
        record_path = self._path(META_DIR, "commits", f"{self.run_id}-{self._commit_seq:05d}.json")
        self._commit_seq += 1
        self._write_bytes(record_path, json.dumps(record).encode())
        for name in self._staged:
            self.fs.mv(posixpath.join(self.staging, name), self._path(name))
        self.files_committed += self._staged
        self._staged, self._staged_rows = [], 0

    def close(self, success: bool, summary: dict[str, Any] | None = None) -> None:
        """Commit what was written (complete rows, also after a failure); `_SUCCESS` only on success."""
        self.commit()
        staging_root = posixpath.dirname(self.staging)
        if self.fs.exists(staging_root):
            self.fs.rm(staging_root, recursive=True)
        if summary is not None:
            self._write_bytes(self._path(META_DIR, "runs", f"{self.run_id}.json"), json.dumps(summary, indent=2).encode())
        if success:
            self._write_bytes(self._path("_SUCCESS"), b"")


def write_part(cfg: OutputConfig, path: str, table: pa.Table) -> None:
    """Write one complete staged part file (any process: driver, Ray task, Spark executor).

    `path` is inside the output's filesystem, or a URL (as `sink.staging` gives it).
    """
    url = path if "://" in path else cfg.path
    fs, _ = fsspec_filesystem(url, cfg.storage)
    path = fs._strip_protocol(path)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    arrow_fs, _ = arrow_filesystem(url, cfg.storage)
    pq.write_table(table, path, filesystem=arrow_fs, compression=cfg.compression)


def open_sink(cfg: OutputConfig, run_id: str, schema: pa.Schema, id_column: str = "id") -> ParquetSink:
    """The sink for `output.format`: a Parquet dataset, a Delta table or an Iceberg table."""
    if cfg.format == "delta":
        from vb_batch.io.lake import DeltaSink

        return DeltaSink(cfg, run_id, schema, id_column)
    if cfg.format == "iceberg":
        from vb_batch.io.lake import IcebergSink

        return IcebergSink(cfg, run_id, schema, id_column)
    return ParquetSink(cfg, run_id, schema, id_column)
