"""The worker half of every sink: staged part files, their reports, and compaction.

Whatever process writes rows (the driver's own `Sink.write`, a Ray task, a
Spark executor), it writes them through the one `PartWriter`: batches streamed
into Parquet files of at most `output.rows_per_file` rows in the run's staging
folder (`<output>/_vb/staging/<run>/`), one open file at a time, never the
rows. A finished file is invisible until the sink's driver half stages it
(`Sink.stage`) and commits it (`vb_batch.io.sinks.base`).

Engines report each file as one `PART_SCHEMA` row (`part_report`), which the
run counts and stages: `StagedParts` writes a task's batches and makes those
reports; `compact` merges short files into files of `output.rows_per_file`
rows on a worker, and `Compactor` decides on the driver which files to merge.

File names: `part-<run>-<tag>-<n>.parquet` (the driver's own:
`part-<run>-<n>.parquet`). A retried task that reuses its tag rewrites the
same files instead of adding rows.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vb_batch.config import OutputConfig
from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.filesystems import arrow_filesystem, fsspec_filesystem
from vb_batch.timing import PhaseTimes, collecting, phase

if TYPE_CHECKING:
    from vb_batch.io.sinks.base import Sink
    from vb_batch.pipeline.resolved import ResolvedJob

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^part-.*\.parquet$")


def part_file_name(run_id: str, tag: str) -> str:
    """`part-<run>-<tag>.parquet`: the one pattern of data files every engine writes."""
    return f"part-{run_id}-{tag}.parquet"


def is_part_name(name: Any) -> bool:
    """A data file name vb_batch writes: `part-*.parquet`, a plain name (no folder, no `..`)."""
    return isinstance(name, str) and bool(PART_RE.match(name)) and posixpath.basename(name) == name and "\\" not in name


# ---------------------------------------------------------------------------- the one staged writer


class StagedFile(NamedTuple):
    """A complete part file in the staging folder: its name, its rows, its `vb_error` column (None without one)."""

    name: str
    rows: int
    errors: pa.ChunkedArray | None


class PartWriter:
    """Streams batches into staged part files of at most `output.rows_per_file` rows (see the module docstring).

    `on_file(file)` is called as each file is complete, before the next one is
    opened (so a commit it starts never cuts the next file short); `close`
    completes the file being written. Any process may use it: it holds one
    open Parquet writer, never the rows.
    """

    def __init__(self, schema: pa.Schema, output: OutputConfig, run_id: str, staging: str,
                 on_file: Callable[[StagedFile], None], tag: str = ""):
        self.schema, self.output, self.run_id, self.staging, self.tag = schema, output, run_id, staging, tag
        self.on_file = on_file
        self._fs, self._root = fsspec_filesystem(staging, output.storage)
        self._arrow_fs = arrow_filesystem(staging, output.storage)[0]
        self._errors_at = schema.get_field_index(ERROR_COLUMN)
        self._writer: pq.ParquetWriter | None = None
        self._name = ""
        self._count = 0
        self._rows = 0
        self._errors: list[pa.Array] = []

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.schema != self.schema:  # the same columns, other field metadata or nullability
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        per_file = self.output.rows_per_file
        start = 0
        while start < batch.num_rows:
            if self._writer is None:
                self._open()
            piece = batch.slice(start, per_file - self._rows)
            self._writer.write_batch(piece)
            if self._errors_at >= 0:
                self._errors.append(piece.column(self._errors_at))
            self._rows += piece.num_rows
            start += piece.num_rows
            if self._rows >= per_file:
                self._finish()

    def close(self) -> None:
        """Complete the file being written, if any."""
        if self._writer is not None:
            self._finish()

    def abort(self) -> None:
        """Close the file being written without reporting it (it stays staged, never committed)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _open(self) -> None:
        self._name = part_file_name(self.run_id, f"{self.tag}-{self._count:03d}" if self.tag else f"{self._count:05d}")
        self._count += 1
        self._fs.makedirs(self._root, exist_ok=True)
        self._writer = pq.ParquetWriter(posixpath.join(self._root, self._name), self.schema,
                                        filesystem=self._arrow_fs, compression=self.output.compression)

    def _finish(self) -> None:
        self._writer.close()
        errors = None
        if self._errors_at >= 0:
            errors = pa.chunked_array(self._errors, type=self.schema.field(self._errors_at).type)
        done = StagedFile(self._name, self._rows, errors)
        self._writer, self._rows, self._errors = None, 0, []
        self.on_file(done)


# ---------------------------------------------------------------------------- part reports


# What an engine reports for each part of the output it wrote: a staged file (or None when the
# sink wrote the rows itself), its rows, input rows skipped as already done, one error code per
# failed row, the seconds the model spent on these rows, and on which nodes it ran; a worker's
# report may add the seconds its model waited for input and for output (null in other reports).
PART_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("skipped", pa.int64()),
        pa.field("error_codes", pa.list_(pa.string())),
        pa.field("model_seconds", pa.float64()),
        pa.field("model_nodes", pa.list_(pa.struct([pa.field("node", pa.string()), pa.field("rows", pa.int64())]))),
        pa.field("phases", pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("seconds", pa.float64())]))),
        pa.field("model_input_wait_seconds", pa.float64()),
        pa.field("model_output_wait_seconds", pa.float64()),
    ]
)


def part_report(
    rows: int, errors: pa.Array | pa.ChunkedArray | None = None, file: str | None = None, skipped: int = 0,
    model_seconds: float = 0.0, model_nodes: dict[str, int] | None = None, phases: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One row of `PART_SCHEMA`; `errors` is the part's `vb_error` column; `phases` the worker's seconds."""
    codes = [] if errors is None else pc.struct_field(errors, "code").drop_null().to_pylist()
    return {
        "file": file, "rows": rows, "skipped": skipped, "error_codes": codes, "model_seconds": model_seconds,
        "model_nodes": [{"node": node, "rows": n} for node, n in sorted((model_nodes or {}).items())],
        "phases": [{"name": name, "seconds": s} for name, s in (phases or {}).items()],
    }


class StagedParts:
    """A task's output batches as staged part files, and the part report of each (workers: Ray, Spark).

    `plan` is the run's resolved job (its run id, `output` section and output
    schema); `staging` the sink's staging URL. `write` and `close` return the
    reports of the files they completed: model seconds go with the file their
    rows went to; `close` adds the skipped rows and the seconds per phase that
    `times`, the task's collector, gathered.
    """

    def __init__(self, plan: ResolvedJob, staging: str, tag: str, times: PhaseTimes | None = None):
        self.plan, self.staging, self.tag, self.times = plan, staging, tag, times
        self.schema = plan.output_schema()
        self._files = PartWriter(self.schema, plan.cfg.output, plan.run_id, staging, self._report, tag)
        self._reports: list[dict[str, Any]] = []
        self._model_seconds = 0.0
        self._nodes: Counter[str] = Counter()

    def write(self, batch: pa.RecordBatch, model_seconds: float = 0.0,
              model_nodes: dict[str, int] | None = None) -> list[dict[str, Any]]:
        self._model_seconds += model_seconds
        self._nodes.update(model_nodes or {})
        with phase("write"):
            self._files.write(batch)
        return self._take_reports()

    def close(self, skipped: int = 0) -> list[dict[str, Any]]:
        with phase("write"):
            self._files.close()
        reports = self._take_reports()
        phases = self.times.as_dict() if self.times is not None else {}
        if skipped or self._model_seconds or self._nodes or phases:  # what no file carries
            reports.append(part_report(0, skipped=skipped, model_seconds=self._model_seconds,
                                       model_nodes=dict(self._nodes), phases=phases))
        return reports

    def _report(self, file: StagedFile) -> None:
        self._reports.append(part_report(file.rows, file.errors, file.name, model_seconds=self._model_seconds,
                                         model_nodes=dict(self._nodes)))
        self._model_seconds, self._nodes = 0.0, Counter()

    def _take_reports(self) -> list[dict[str, Any]]:
        reports, self._reports = self._reports, []
        return reports


def stage_parts(plan: ResolvedJob, staging: str, table: pa.Table, tag: str, model_seconds: float = 0.0,
                model_nodes: dict[str, int] | None = None, skipped: int = 0,
                times: PhaseTimes | None = None) -> list[dict[str, Any]]:
    """Write one table through `StagedParts`; the reports of its files."""
    parts = StagedParts(plan, staging, tag, times)
    reports = []
    for n, batch in enumerate(table.to_batches()):
        reports += parts.write(batch, model_seconds if n == 0 else 0.0, model_nodes if n == 0 else None)
    return reports + parts.close(skipped)


# ---------------------------------------------------------------------------- compaction


def compact(plan: ResolvedJob, staging: str, names: list[str], tag: str) -> list[dict[str, Any]]:
    """Worker side: stream the staged part files `names` into files of `output.rows_per_file` rows.

    Returns their part reports (rows and error codes; the small files' counts
    were taken already); the last may hold fewer rows. The small files are
    deleted once the new ones are complete; a retry (same `tag`) rewrites the
    same new files.
    """
    storage = plan.cfg.output.storage
    times = PhaseTimes()
    with collecting(times):
        arrow_fs, root = arrow_filesystem(staging, storage)
        parts = StagedParts(plan, staging, tag)
        reports = []
        for name in names:
            with arrow_fs.open_input_file(posixpath.join(root, name)) as f:
                for batch in pq.ParquetFile(f).iter_batches():
                    reports += parts.write(batch)
        reports += parts.close()
        fs, fs_root = fsspec_filesystem(staging, storage)
        for name in names:
            fs.rm(posixpath.join(fs_root, name))
    if reports:  # all of it as one phase: what compaction adds to a run
        reports[-1]["phases"] = [{"name": "compact", "seconds": times.total()}]
    return reports


class PartCounter(Protocol):
    """What the compactor needs of a run (`vb_batch.engines.core.Run` is one): the sink its files are staged
    in, and where each part report is counted (`apply`: rows, errors, model seconds, phases; a report that
    names a file also stages it)."""

    sink: Sink

    def apply(self, report: dict[str, Any]) -> None: ...


class Compactor:
    """Part files of exactly `output.rows_per_file` rows from tasks that write shorter ones (driver side).

    Counts every part report (`run.apply`); a file of `rows_per_file` rows is
    staged at once, shorter ones are pooled, and once the pool adds up to a
    file's worth, `submit(names, tag)` (a `compact` task on the cluster, as a
    `concurrent.futures.Future`) merges them; what it leaves over is pooled
    again. `finish` compacts the rest into the run's last, shorter file.

    The time rule (`output.commit_every_s`): when the sink's commit is due and
    rows wait in the pool, the pool is merged at once into one shorter file,
    staged and committed whatever its size (the driver waits for that one
    merge), so pooled rows wait no longer than the sink's own.
    """

    def __init__(self, run: PartCounter, submit: Callable[[list[str], str], Future]):
        self.run, self.submit = run, submit
        self.sink = run.sink
        self.per_file = run.sink.cfg.rows_per_file
        self.pool: list[tuple[str, int]] = []
        self.in_flight: set[Future] = set()
        self.flushing: Future | None = None  # the time rule's merge, until collected: committed whatever its size
        self.tasks = 0

    def add(self, report: dict[str, Any]) -> None:
        self.run.apply({**report, "file": None})
        if report["file"]:
            if report["rows"] >= self.per_file:
                self.sink.stage(report["file"], report["rows"])
            else:
                self.pool.append((report["file"], report["rows"]))
        self._collect(wait=False)
        if self._pooled_rows() >= self.per_file:
            self._launch()
        elif self.pool and self.sink.commit_due():
            self.flushing = self._launch()
            futures_wait([self.flushing])  # a short merge: its rows are committed now, not at the next report
            self._collect(wait=False)

    def finish(self) -> None:
        while self.in_flight:
            self._collect(wait=True)
            if self._pooled_rows() >= self.per_file:
                self._launch()
        if len(self.pool) > 1:
            self._launch()
            self._collect(wait=True, last=True)
        for name, rows in self.pool:  # one short file left: the last file as it is
            self.sink.stage(name, rows)
        self.pool = []

    def _pooled_rows(self) -> int:
        return sum(rows for _, rows in self.pool)

    def _launch(self) -> Future:
        names = [name for name, _ in self.pool]
        self.pool = []
        future = self.submit(names, f"c{self.tasks:06d}")
        self.in_flight.add(future)
        self.tasks += 1
        return future

    def _collect(self, wait: bool, last: bool = False) -> None:
        if not self.in_flight:
            return
        done, self.in_flight = futures_wait(self.in_flight, timeout=None if wait else 0, return_when=FIRST_COMPLETED)
        for future in done:
            flushed = future is self.flushing
            for report in future.result():
                if report["rows"] < self.per_file and not (last or flushed):
                    self.pool.append((report["file"], report["rows"]))
                else:
                    self.sink.stage(report["file"], report["rows"])
                if report.get("phases"):  # the merge's own seconds; its rows were counted with the small files
                    self.run.apply(part_report(0, phases={e["name"]: e["seconds"] for e in report["phases"]}))
            if flushed:
                self.flushing = None
                self.sink.commit()
