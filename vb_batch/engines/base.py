"""The run core every engine shares, and the small protocol an engine implements.

A run, whatever executes it:

    engine.check(cfg, backend)           refuse what this engine cannot do (fast, nothing opened)
    run = start_run(cfg, engine.name)    source, plan, sink; input/output overlap, ids, the output's
                                         ownership and fingerprint checked before anything is changed
    with run.sink.lease_held():          one writer per output
        with engine.session(run, backend) as session:    load the model / join the cluster
            done = run.sink.open()       recover, apply the mode; committed ids -> run.resume
            with tracked_run(run):       progress, error budget, commit + run record + _SUCCESS
                engine.execute(run, session)
        after(summary)                   e.g. the report; then the run record gets the final times

A resume whose input ids are all committed opens the sink first and returns
without loading the model or joining a cluster.

Time: every thread of the run (and every Ray or Spark task, through its part
reports) collects seconds per phase (`vb_batch.timing`) into `run.times`; the
summary gives those, and the driver's wall time split into start, model
load, processing, closing and `after`, with what is left unexplained.

An engine only decides where the stages run. Whatever it runs, it reports
each written part with `run.apply(report)` (one schema, `PART_SCHEMA`: file,
rows, skipped, error codes, model seconds, model nodes), so the summary, the
commits and the progress bar work the same everywhere. What a worker process
needs (the resume filter, the cached backend, part-file naming, rebatching)
lives here too, so every engine filters, names and counts the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from queue import Full, Queue
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from vb_batch.config import ConfigError, JobConfig, redacted
from vb_batch.io.filesystems import (
    arrow_filesystem,
    canonical_location,
    check_bucket,
    fsspec_filesystem,
)
from vb_batch.io.formats import open_sink
from vb_batch.io.sinks import Sink, part_file_name, schema_fingerprint
from vb_batch.io.sources import Source, open_source
from vb_batch.masking import mask_text, mask_url, secret_values
from vb_batch.models.base import ModelBackend, backend_class, create_backend, resolved_model_settings
from vb_batch.registry import replay
from vb_batch.stages import ERROR_COLUMN, Plan, check_backend
from vb_batch.timing import COUNTS, PhaseTimes, collecting, current, phase

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------- the summary


@dataclass
class RunSummary:
    """What a run did; printed at the end and written to `<output>/_vb/runs/<run_id>.json`."""

    run_id: str
    output: str
    engine: str
    rows_read: int = 0
    rows_skipped: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    success: bool = False
    message: str = ""
    report: str = ""
    # Where the model's time went, from engines that measure it (None elsewhere): seconds in the
    # model stage, summed over model workers; seconds to load the model (local); seconds the model
    # thread waited for decoded input and for the writer (local: a fed model waits near zero).
    model_seconds: float | None = None
    model_load_seconds: float | None = None
    model_input_wait_seconds: float | None = None
    model_output_wait_seconds: float | None = None
    model_nodes: dict[str, int] = field(default_factory=dict)  # rows per node that ran the model (Ray)
    # Model calls (one per task, pass and group of rows) and the images they answered, summed over workers.
    model_calls: int | None = None
    model_images: int | None = None
    # Busy seconds per phase (`vb_batch.timing.PHASES`), summed over threads and workers: they overlap,
    # so their sum may exceed `seconds`.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # The driver's wall time, in order: start (source, plan, checks, lease, sink), model_load,
    # processing (the engine's loop), closing (last commit, run record), after (the report);
    # `unexplained_seconds` is `seconds` minus their sum.
    wall_seconds: dict[str, float] = field(default_factory=dict)
    unexplained_seconds: float = 0.0
    estimate: dict[str, Any] | None = None  # hosted backends: requests and cost, before the run
    model_settings: dict[str, Any] = field(default_factory=dict)  # defaults resolved from the checkpoint

    @property
    def rows_processed(self) -> int:
        return self.rows_ok + self.rows_failed

    @property
    def rows_per_second(self) -> float:
        return self.rows_processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_fraction(self) -> float:
        return self.rows_failed / self.rows_processed if self.rows_processed else 0.0

    def within_error_budget(self, max_fraction: float) -> bool:
        """False (with a message) when more than `max_fraction` of the processed rows failed."""
        if self.error_fraction <= max_fraction:
            return True
        self.message = (
            f"error fraction {self.error_fraction:.3f} exceeds run.max_error_fraction={max_fraction}; "
            "rows that succeeded are committed"
        )
        return False

    def count_errors(self, rows: int, codes: list[str]) -> None:
        """Count `rows` processed rows, of which those in `codes` (one code per failed row) failed."""
        self.rows_failed += len(codes)
        self.rows_ok += rows - len(codes)
        for code, n in Counter(codes).items():
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 3)}

    def take_times(self, times: PhaseTimes) -> None:
        """Seconds per phase, and the model's call counts that travel with them, from the run's collector."""
        phases = times.as_dict()
        counts = {name: phases.pop(name) for name in COUNTS if name in phases}
        self.phase_seconds = phases
        if "model_calls" in counts:
            self.model_calls = round(counts["model_calls"])
            self.model_images = round(counts.get("model_images", 0))

    def model_line(self) -> str:
        """e.g. "1.92 s, 80% of the run; waited 0.04 s for input, 0.00 s for the writer; loaded in 0.38 s"."""
        parts = [f"{self.model_seconds:.2f} s"]
        if self.model_input_wait_seconds is not None:  # one model thread (local)
            if self.seconds > 0:
                parts[0] += f", {self.model_seconds / self.seconds:.0%} of the run"
            parts.append(
                f"waited {self.model_input_wait_seconds:.2f} s for input, "
                f"{self.model_output_wait_seconds or 0.0:.2f} s for the writer"
            )
        else:
            parts[0] += " summed over the model workers"
        if self.model_load_seconds is not None:
            parts.append(f"loaded in {self.model_load_seconds:.2f} s")
        if self.model_calls:
            parts.append(f"{self.model_calls} calls of {self.model_images / self.model_calls:.1f} images on average")
        return "; ".join(parts)

    def render(self) -> str:
        status = "finished" if self.success else "FAILED"
        lines = [
            f"vb-batch run {self.run_id} {status} ({self.engine} engine) in {self.seconds:.1f} s",
            f"  rows: {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_skipped} skipped (already done)"
            f" of {self.rows_read} read; {self.rows_per_second:.2f} rows/s",
        ]
        for code, n in sorted(self.errors_by_code.items(), key=lambda kv: -kv[1]):
            lines.append(f"  error {code}: {n} row(s)")
        if self.model_seconds is not None:
            lines.append(f"  model: {self.model_line()}")
        if self.estimate:
            from vb_batch.models.hosted import describe_estimate

            lines.append(f"  estimate: {describe_estimate(self.estimate)}")
        if self.wall_seconds:
            spent = " + ".join(f"{name.replace('_', ' ')} {s:.2f}" for name, s in self.wall_seconds.items())
            lines.append(f"  wall: {spent} s; unexplained {self.unexplained_seconds:.2f} s")
        if self.phase_seconds:
            busy = ", ".join(f"{name.replace('_', '+')} {s:.2f}" for name, s in self.phase_seconds.items())
            lines.append(f"  busy (s, summed over threads and workers): {busy}")
        lines.append(f"  output: {self.output}")
        if self.report:
            lines.append(f"  report: {self.report}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


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


# ---------------------------------------------------------------------------- resume


class ResumeFilter:
    """The ids already committed, dropped from batches by the id column's name (never its position).

    Ships cheaply to workers (one Arrow array). Each process builds its lookup
    set once per run (`key`), however many tasks deserialise the filter, so a
    batch costs one lookup per row whatever the number of committed ids.
    """

    _LOOKUPS: dict[str, frozenset] = {}  # per process: run key -> committed ids
    _LOCK = threading.Lock()

    def __init__(self, done: pa.Array | None, id_column: str, key: str | None = None):
        self.done = done if done is not None else pa.array([], pa.string())
        self.id_column = id_column
        self.key = key or uuid.uuid4().hex

    def __len__(self) -> int:
        return len(self.done)

    def _ids(self) -> frozenset:
        lookups = ResumeFilter._LOOKUPS
        with ResumeFilter._LOCK:
            if self.key not in lookups:
                lookups.clear()  # one run at a time per worker process: drop the previous run's set
                lookups[self.key] = frozenset(self.done.to_pylist())
            return lookups[self.key]

    def apply(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, int]:
        """(the batch without committed rows, how many were dropped)."""
        if not len(self.done) or batch.num_rows == 0:
            return batch, 0
        index = batch.schema.get_field_index(self.id_column)
        if index < 0:
            raise ConfigError(f"input.id_column: {self.id_column!r} is not a column of the batch {batch.schema.names}")
        done = self._ids()
        keep = pa.array([i not in done for i in batch.column(index).to_pylist()], pa.bool_())
        kept = batch.filter(keep)
        return kept, batch.num_rows - kept.num_rows


# ---------------------------------------------------------------------------- worker side


_BACKENDS: dict[str, ModelBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def cached_backend(plan: Plan) -> ModelBackend:
    """The model for `plan`, built once per worker process and kept across tasks (Spark, Ray, helpers).

    Backends, profiles and presets that the driver registered at run time are
    registered here first, so a worker knows them too.
    """
    key = plan.cfg.model.model_dump_json()
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            replay(plan.registrations)
            backend = create_backend(plan.cfg.model)
            check_backend(plan, backend)
            _BACKENDS[key] = backend
        return _BACKENDS[key]


def rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup batches into batches of exactly `rows` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, rows).to_batches()[0]
            rest = table.slice(rows)
            pending = rest.to_batches() if rest.num_rows else []
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items`, produced on a background thread at most `depth` ahead of the consumer.

    The producer's exception is raised in the consumer, after the items before it.
    Closing the consumer early stops the producer after the item it is reading.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()
    end = object()
    times = current()  # the producer's phases count for the consumer's run

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        with contextlib.ExitStack() as scope:
            if times is not None:
                scope.enter_context(collecting(times))
            produce_items()

    def produce_items() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, exc))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="vb-read", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = queue.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One job run as the engines see it: config, source, plan, sink, summary, the committed ids."""

    cfg: JobConfig
    source: Source
    plan: Plan
    sink: Sink
    summary: RunSummary
    started: float
    resume: ResumeFilter | None = None
    advance: Callable[[int], None] = lambda rows: None
    times: PhaseTimes = field(default_factory=PhaseTimes)  # seconds per phase, every thread and worker
    ids: pa.Array | None = None  # the input's ids, when it has an id column (read by the id checks)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def apply(self, report: dict[str, Any]) -> None:
        """Count one part report (see `PART_SCHEMA`); a reported file is staged for the next commit."""
        with self._lock:
            if report["file"]:
                self.sink.stage(report["file"], report["rows"])
            summary = self.summary
            summary.count_errors(report["rows"], report["error_codes"])
            summary.rows_skipped += report["skipped"]
            if report["model_seconds"]:
                summary.model_seconds = (summary.model_seconds or 0.0) + report["model_seconds"]
            for entry in report["model_nodes"]:
                summary.model_nodes[entry["node"]] = summary.model_nodes.get(entry["node"], 0) + entry["rows"]
            self.times.merge({entry["name"]: entry["seconds"] for entry in report.get("phases") or []})
            self.advance(report["rows"] + report["skipped"])

    def pending_batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """The source's rows, minus those already committed, in batches of at most `rows` (one process)."""
        for batch in self.source.batches(rows):
            batch, skipped = self.resume.apply(batch) if self.resume else (batch, 0)
            if skipped:
                self.apply(part_report(0, skipped=skipped))
            if batch.num_rows:
                yield batch


def start_run(cfg: JobConfig, engine: str, started: float | None = None) -> Run:
    """Open the source, plan the output and check everything that must hold before the output is touched."""
    started = started or time.perf_counter()
    source = open_source(cfg.input)
    check_paths(cfg, source)
    if cfg.output.format != "iceberg":
        check_bucket(cfg.output.path, cfg.output.storage, "output.path")
    ids = check_ids(source)
    plan = Plan.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    schema = plan.output_schema()
    sink = open_sink(cfg.output, plan.run_id, schema, source.id_column,
                     fingerprint=schema_fingerprint(schema, plan.model, plan.profile),
                     retry_failed=cfg.run.retry_failed)
    sink.check()
    summary = RunSummary(run_id=plan.run_id, output=mask_url(cfg.output.name), engine=engine,
                         model_settings=resolved_model_settings(cfg.model))
    # The ids let a resume with nothing left return before the model loads.
    keep_ids = source.has_id and cfg.output.mode == "resume"
    return Run(cfg, source, plan, sink, summary, started, ids=ids if keep_ids else None)


def check_paths(cfg: JobConfig, source: Source) -> None:
    """Refuse an output that is, contains or sits inside the input (symlinks and URL spellings resolved)."""
    output = cfg.output.path
    if cfg.output.format == "iceberg":  # where its catalog keeps (or will create) the table
        from vb_batch.io.iceberg import planned_location

        output = planned_location(cfg.output)
    if not output:
        return
    field_name = "output.path" if cfg.output.format != "iceberg" else "output.table"
    inputs = {cfg.input.path or "", source.location or ""} - {""}
    out = canonical_location(output, cfg.output.storage)
    for path in inputs:
        inp = canonical_location(path, cfg.input.storage)
        if out == inp or out.startswith(inp.rstrip("/") + "/") or inp.startswith(out.rstrip("/") + "/"):
            relation = "is" if out == inp else ("sits inside" if out.startswith(inp) else "contains")
            raise ConfigError(
                f"{field_name}: the output {output!r} {relation} the input {path!r}; vb_batch never writes where it "
                "reads, choose an output outside the input"
            )


# Ids to show when refusing an input.
SHOWN_IDS = 5


def check_ids(source: Source) -> pa.Array | None:
    """Refuse null, NaN or duplicate ids before any row is processed (they would break exactly-once); the ids.

    Only an id column of the input (or the URI column its ids come from) is
    read; content-hash ids of images without an id are computed as rows are
    processed (identical images share one id: give such inputs an id column).
    """
    column = source.id_column if source.has_id else source.uri_column
    if column is None:
        return None
    ids = source.dataset.to_table(columns=[column], filter=source.filter).column(column).combine_chunks()
    field_name = "input.id_column" if source.has_id else "input.uri_column"
    problems = []
    if ids.null_count:
        problems.append(f"{ids.null_count} null id(s)")
    if pa.types.is_floating(ids.type):
        nans = pc.sum(pc.is_nan(ids.drop_null())).as_py() or 0
        if nans:
            problems.append(f"{nans} NaN id(s)")
    counts = pc.value_counts(ids.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        examples = [f"{v!r} x{n}" for v, n in zip(repeated.field("values").to_pylist()[:SHOWN_IDS],
                                                     repeated.field("counts").to_pylist()[:SHOWN_IDS])]
        extra = int(pc.sum(repeated.field("counts")).as_py()) - len(repeated)
        problems.append(f"{len(repeated)} id(s) repeated ({extra} extra rows), e.g. {', '.join(examples)}")
    if problems:
        raise ConfigError(
            f"{field_name}: column {column!r} must identify each row exactly once: {'; '.join(problems)}. "
            "Fix the input, filter those rows out (input.filter), or pick another id column"
        )
    return ids


@contextlib.contextmanager
def tracked_run(run: Run, record: Callable[[], dict[str, Any]] = dict) -> Iterator[None]:
    """What every engine does around its loop: progress, the error budget, and closing the sink.

    On the way out the sink commits what was written (also after a failure)
    and writes `_SUCCESS` only when the run succeeded; the run record gets the
    summary, the redacted config and `record()`.
    """
    cfg, summary = run.cfg, run.summary
    bar = tqdm(total=summary.rows_read or None, unit="img", desc="vb-batch", disable=not cfg.run.progress, smoothing=0.1)

    def advance(rows: int) -> None:
        bar.update(rows)
        bar.set_postfix(ok=summary.rows_ok, failed=summary.rows_failed, refresh=False)

    run.advance = advance
    try:
        yield
        # Every row read was processed, or dropped before the model as already committed.
        summary.rows_skipped = max(summary.rows_skipped, summary.rows_read - summary.rows_processed)
        summary.success = summary.within_error_budget(cfg.run.max_error_fraction)
    except BaseException as exc:
        # The run record is stored with the output: what an exception says is masked like the config.
        summary.message = mask_text(f"stopped by {type(exc).__name__}: {exc}", secret_values(cfg.model_dump(mode="json")))
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - run.started
        summary.take_times(run.times)
        run.sink.close(success=summary.success, summary={**summary.as_dict(), "config": redacted(cfg), **record()})


# ---------------------------------------------------------------------------- engines


class Engine:
    """What an engine implements: see the module docstring. Engines are registered in `vb_batch.engines.ENGINES`."""

    name: ClassVar[str]
    # Whether a backend *instance* can be used (only where the model runs in this process).
    accepts_backend_instance: ClassVar[bool] = False

    def check(self, cfg: JobConfig, backend: ModelBackend | None) -> None:
        """Refuse a job this engine cannot run, before anything is opened."""
        if backend is not None and not self.accepts_backend_instance:
            raise ConfigError(
                f"engine.kind: the {self.name} engine builds the model in each worker from model.*; a backend "
                "instance works only with the local engine; name your own as model.backend: package.module:Class"
            )

    @contextlib.contextmanager
    def session(self, run: Run, backend: ModelBackend | None) -> Iterator[Any]:
        """Set up what `execute` needs (a loaded model, a cluster connection) and tear it down after."""
        yield backend

    def execute(self, run: Run, session: Any) -> None:
        raise NotImplementedError


def execute_run(engine: Engine, cfg: JobConfig, backend: ModelBackend | None = None,
                after: Callable[[RunSummary], None] | None = None) -> RunSummary:
    """Run `cfg` on `engine`: the run core every engine shares (see the module docstring).

    `after(summary)` runs once the rows are committed, still holding the output (the report);
    its time is part of the run's, and the run record is rewritten with the final times.
    """
    engine.check(cfg, backend)
    started = time.perf_counter()
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        run.summary.wall_seconds[name] = round(run.summary.wall_seconds.get(name, 0.0) + now - clock[0], 4)
        clock[0] = now

    with contextlib.ExitStack() as scope:
        run = start_run(cfg, engine.name, started)
        scope.enter_context(collecting(run.times))
        scope.enter_context(run.sink.lease_held())
        # Resume never clears anything: open first, and skip the model when every input id is committed.
        done = run.sink.open() if cfg.output.mode == "resume" else None
        if done is not None and all_committed(run.ids, done):
            run.resume = ResumeFilter(done, run.source.id_column, key=run.plan.run_id)
            run.summary.rows_read = len(run.ids)
            lap("start")
            with tracked_run(run, lambda: {"nothing_to_do": True}):
                run.summary.message = "nothing to do: every input id is committed (the model was not loaded)"
            lap("closing")
        else:
            lap("start")
            with engine.session(run, backend) as session:
                lap("model_load")
                if cfg.output.mode != "resume":
                    done = run.sink.open()
                run.resume = ResumeFilter(done, run.source.id_column, key=run.plan.run_id)
                run.summary.rows_read = run.source.count_rows()
                log.info("run %s on %s: %s", run.plan.run_id, engine.name, redacted(cfg))
                estimate_cost(run)
                try:
                    with tracked_run(run):
                        lap("start")
                        try:
                            engine.execute(run, session)
                        finally:
                            lap("processing")
                finally:
                    lap("closing")
            lap("closing")
        if after is not None:
            after(run.summary)
            lap("after")
        finish_times(run)
    return run.summary


def estimate_cost(run: Run) -> None:
    """For backends that price their calls (hosted models): requests and cost before any is made."""
    backend = backend_class(run.cfg.model.backend)
    if not hasattr(backend, "estimate"):
        return
    from vb_batch.models.hosted import describe_estimate

    pending = max(0, run.summary.rows_read - len(run.resume or []))
    passes = sum(task.passes(run.plan.ctx) for task in run.plan.tasks)
    run.summary.estimate = backend.estimate(run.cfg.model, pending, passes)
    line = f"vb-batch estimate: {describe_estimate(run.summary.estimate)}"
    log.info(line)
    if run.cfg.run.progress:
        print(line, file=sys.stderr, flush=True)


def all_committed(ids: pa.Array | None, done: pa.Array) -> bool:
    """Whether every input id is among the committed ones (False when the input has no id column)."""
    if ids is None or len(done) < len(ids):
        return False
    try:
        return bool(pc.all(pc.is_in(ids, value_set=done.cast(ids.type))).as_py()) if len(ids) else True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # ids of another type than the output's: run normally
        return False


def finish_times(run: Run) -> None:
    """The run's final times, including closing and `after`, into the summary and the run record."""
    summary = run.summary
    summary.seconds = time.perf_counter() - run.started
    summary.take_times(run.times)
    summary.unexplained_seconds = round(max(0.0, summary.seconds - sum(summary.wall_seconds.values())), 4)
    with contextlib.suppress(Exception):  # the record written at close stands if this one cannot be
        run.sink.update_run_record(summary.as_dict())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

