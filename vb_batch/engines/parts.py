"""Part reports and staged part files: what a worker writes and tells the driver.

A worker streams its output batches into staged Parquet files (`StagedParts`)
and reports each finished file as one `PART_SCHEMA` row; the driver stages the
file in the sink and counts the report (`Run.apply`). Short files left at the
end of tasks are merged to `output.rows_per_file` by `compact` / `Compactor`.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.filesystems import (
    arrow_filesystem,
    fsspec_filesystem,
)
from vb_batch.io.sinks import part_file_name
from vb_batch.stages import Plan
from vb_batch.timing import PhaseTimes, collecting, phase

if TYPE_CHECKING:
    from vb_batch.engines.core import Run

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------- part reports


# What an engine reports for each part of the output it wrote: a staged file (or None when the
# sink wrote the rows itself), its rows, input rows skipped as already done, one error code per
# failed row, the seconds the model spent on these rows, and on which nodes it ran.
PART_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("skipped", pa.int64()),
        pa.field("error_codes", pa.list_(pa.string())),
        pa.field("model_seconds", pa.float64()),
        pa.field("model_nodes", pa.list_(pa.struct([pa.field("node", pa.string()), pa.field("rows", pa.int64())]))),
        pa.field("phases", pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("seconds", pa.float64())]))),
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
    """Streams output batches into staged part files of at most `output.rows_per_file` rows.

    Any process may use it (Ray tasks, Spark executors): it holds one open
    Parquet writer, never the rows, so a task's memory is one batch whatever
    its unit's size. Files are named `part-<run>-<tag>-<n>`, so a retried task
    that reuses its tag rewrites the same files instead of adding rows.
    `write` and `close` return the reports of the files they completed (model
    seconds go with the file their rows went to; `close` adds the skipped rows
    and the seconds per phase that `times`, the task's collector, gathered).
    """

    def __init__(self, plan: Plan, staging: str, tag: str, times: PhaseTimes | None = None):
        self.plan, self.staging, self.tag, self.times = plan, staging, tag, times
        self.schema = plan.output_schema()
        self._writer: pq.ParquetWriter | None = None
        self._count = 0
        self._rows = 0
        self._errors: list[pa.Array] = []
        self._model_seconds = 0.0
        self._nodes: Counter[str] = Counter()

    def write(self, batch: pa.RecordBatch, model_seconds: float = 0.0,
              model_nodes: dict[str, int] | None = None) -> list[dict[str, Any]]:
        reports, start = [], 0
        per_file = self.plan.cfg.output.rows_per_file
        self._model_seconds += model_seconds
        self._nodes.update(model_nodes or {})
        with phase("write"):
            while start < batch.num_rows:
                if self._writer is None:
                    self._open()
                piece = batch.slice(start, per_file - self._rows)
                self._writer.write_batch(piece)
                self._errors.append(piece.column(piece.schema.get_field_index(ERROR_COLUMN)))
                self._rows += piece.num_rows
                start += piece.num_rows
                if self._rows >= per_file:
                    reports.append(self._finish_file())
        return reports

    def close(self, skipped: int = 0) -> list[dict[str, Any]]:
        with phase("write"):
            reports = [self._finish_file()] if self._writer is not None else []
        phases = self.times.as_dict() if self.times is not None else {}
        if skipped or self._model_seconds or self._nodes or phases:  # what no file carries
            reports.append(part_report(0, skipped=skipped, model_seconds=self._model_seconds,
                                       model_nodes=dict(self._nodes), phases=phases))
        return reports

    def _open(self) -> None:
        self._name = part_file_name(self.plan.run_id, f"{self.tag}-{self._count:03d}")
        self._count += 1
        cfg = self.plan.cfg.output
        url = f"{self.staging}/{self._name}"
        fs, path = fsspec_filesystem(url, cfg.storage)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._writer = pq.ParquetWriter(path, self.schema, filesystem=arrow_filesystem(url, cfg.storage)[0],
                                        compression=cfg.compression)

    def _finish_file(self) -> dict[str, Any]:
        self._writer.close()
        errors = pa.chunked_array(self._errors, type=self.schema.field(ERROR_COLUMN).type)
        report = part_report(self._rows, errors, self._name, model_seconds=self._model_seconds,
                             model_nodes=dict(self._nodes))
        self._writer, self._rows, self._errors, self._model_seconds, self._nodes = None, 0, [], 0.0, Counter()
        return report


def stage_parts(plan: Plan, staging: str, table: pa.Table, tag: str, model_seconds: float = 0.0,
                model_nodes: dict[str, int] | None = None, skipped: int = 0,
                times: PhaseTimes | None = None) -> list[dict[str, Any]]:
    """Write one table through `StagedParts`; the reports of its files."""
    parts = StagedParts(plan, staging, tag, times)
    reports = []
    for n, batch in enumerate(table.to_batches()):
        reports += parts.write(batch, model_seconds if n == 0 else 0.0, model_nodes if n == 0 else None)
    return reports + parts.close(skipped)


def compact(plan: Plan, staging: str, names: list[str], tag: str) -> list[dict[str, Any]]:
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


class Compactor:
    """Part files of exactly `output.rows_per_file` rows from tasks that write shorter ones (driver side).

    Counts every part report (`run.apply`); a file of `rows_per_file` rows is
    staged at once, shorter ones are pooled, and once the pool adds up to a
    file's worth, `submit(names, tag)` (a `compact` task on the cluster, as a
    `concurrent.futures.Future`) merges them; what it leaves over is pooled
    again. `finish` compacts the rest into the run's last, shorter file.
    """

    def __init__(self, run: Run, submit: Callable[[list[str], str], Future]):
        self.run, self.submit = run, submit
        self.per_file = run.cfg.output.rows_per_file
        self.pool: list[tuple[str, int]] = []
        self.in_flight: set[Future] = set()
        self.tasks = 0

    def add(self, report: dict[str, Any]) -> None:
        self.run.apply({**report, "file": None})
        if report["file"]:
            if report["rows"] >= self.per_file:
                self.run.sink.stage(report["file"], report["rows"])
            else:
                self.pool.append((report["file"], report["rows"]))
        self._collect(wait=False)
        if self._pooled_rows() >= self.per_file:
            self._launch()

    def finish(self) -> None:
        while self.in_flight:
            self._collect(wait=True)
            if self._pooled_rows() >= self.per_file:
                self._launch()
        if len(self.pool) > 1:
            self._launch()
            self._collect(wait=True, last=True)
        for name, rows in self.pool:  # one short file left: the last file as it is
            self.run.sink.stage(name, rows)
        self.pool = []

    def _pooled_rows(self) -> int:
        return sum(rows for _, rows in self.pool)

    def _launch(self) -> None:
        names = [name for name, _ in self.pool]
        self.pool = []
        self.in_flight.add(self.submit(names, f"c{self.tasks:06d}"))
        self.tasks += 1

    def _collect(self, wait: bool, last: bool = False) -> None:
        if not self.in_flight:
            return
        done, self.in_flight = futures_wait(self.in_flight, timeout=None if wait else 0, return_when=FIRST_COMPLETED)
        for future in done:
            for report in future.result():
                if report["rows"] < self.per_file and not last:
                    self.pool.append((report["file"], report["rows"]))
                else:
                    self.run.sink.stage(report["file"], report["rows"])
                self.run.times.merge({e["name"]: e["seconds"] for e in report.get("phases") or []})


