"""The Spark engine: the same stages in Spark's Python workers, the commit on the driver.

    driver:    list the input as units (row groups / listing slices) -> a DataFrame, one row a unit
    executors: mapInArrow: read the unit (pyarrow, any fsspec URL) -> the one per-batch loop
               (`annotate_stream`: fetch_decode and decode_encode on a thread overlapping the
               model, cached once per Python worker; rows of one working size share calls
               across the unit's batches) -> staged Parquet files in the sink's staging dir,
               each published as it is complete (`ReportBoard`) -> one tail row per unit
    driver:    polls the board while the jobs run: run.apply(part report) stages each file in
               the sink, which commits by rows or by time (the run core); the tail rows (rows
               skipped, seconds per phase, the model's waits) come back with the job

Part reports reach the driver as files are complete, not when a task ends:
a task publishes each finished file's report as a small JSON file under
`<staging>/reports/`, named by the unit, the first row of the unit (after the
resume filter) the file holds, its rows and the task attempt. The driver
takes a unit's reports in row order, each starting where the previous ended
(a chain), so `output.commit_every_s` holds on Spark as it does on the other
engines: a task closes its open file every `commit_every_s / 2` seconds, and
the driver commits within `commit_every_s` of the file's report. A retried
task attempt starts where the chain its predecessors published ends (their
files are already staged, maybe committed): no row is done twice, none is
lost. When a wave's job ends, each unit's chain must reach the row its
successful attempt ended at, or the run stops (a resume completes it).
Speculative execution (two live attempts of one unit) is refused.

A Python worker is reused for task after task (`spark.python.worker.reuse`),
so what it keeps (imports, the cached model, the codecs' colour tables) is
paid once, and a task adds only its queues: a few model batches and one open
file, whatever the unit's size or the job's rows. Measured: a worker's unique
memory at the end of each of 40 tasks stayed within 3 MB of its first, and its
peak is the same at 2k and 100k rows (`benchmarks/bench_memory.py`).

Reading and writing happen on the Python side on purpose: the pyspark wheel
has no s3a connector (and no JARs can be fetched), and Spark's own Parquet
writer drops the Arrow field metadata (`vb.unit`, `vb.scale`, `vb.legend`, ...)
that makes the output self-describing. This way local, Ray and Spark write
byte-for-byte the same schema. Users' own DataFrames go through
`vb_batch.integrations.spark.annotate` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import pyarrow as pa

from vb_batch.config import (
    ConfigError,
    EngineConfig,
    InputConfig,
    JobConfig,
    StorageOptions,
)
from vb_batch.engines.core import Engine, Run
from vb_batch.engines.resume import ResumeFilter
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.sinks.staging import (
    PART_SCHEMA,
    Compactor,
    StagedParts,
    compact,
    part_report,
)
from vb_batch.io.sources import read_unit, with_ids
from vb_batch.logs import spark_log_conf
from vb_batch.pipeline.loop import ModelClock, annotate_stream
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.stream import cached_backend
from vb_batch.timing import PhaseTimes, collecting

log = logging.getLogger(__name__)

# What a task hands back through Spark when its unit is done: a part report without a file (rows
# skipped, seconds per phase, the model's waits), the unit, and the row of the unit it ended at.
TAIL_SCHEMA = PART_SCHEMA.append(pa.field("unit", pa.int64())).append(pa.field("rows_end", pa.int64()))


def spark_session(engine: EngineConfig, app_name: str):
    """A SparkSession for the job: the configured master, Python workers on this interpreter."""
    from pyspark.sql import SparkSession

    # Python workers take their interpreter from the environment (spark.pyspark.python is not enough in local mode).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Under spark-submit (which hands us its gateway) the master comes from spark-submit.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    master = engine.master or (None if submitted else "local[*]")
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    conf = {
        "spark.pyspark.python": sys.executable,
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(engine.arrow_batch_rows),
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "true",
    }
    if master and master.startswith("local"):
        conf.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false"})
    conf.update(spark_log_conf())  # no console bar off a terminal; JSON driver logs with --log-format json
    conf.update(engine.spark_conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def gpu_profile(engine: EngineConfig):
    """A stage-level resource profile asking `engine.gpus_per_task` GPUs per task (None without GPUs)."""
    if not engine.gpus_per_task:
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    requests = TaskResourceRequests().cpus(1).resource("gpu", engine.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def check_no_speculation(conf: dict[str, str] | Any) -> None:
    """Refuse speculative execution: two live attempts of one unit would publish rival chains of files."""
    value = conf.get("spark.speculation") if isinstance(conf, dict) else conf.get("spark.speculation", "false")
    if str(value or "false").strip().lower() == "true":
        raise ConfigError(
            "engine.spark_conf: spark.speculation is true; the spark engine commits each task's files as they "
            "are written, which a speculative copy of a task would duplicate: set spark.speculation=false "
            "(failed tasks are still retried, from where they stopped)"
        )


# ---------------------------------------------------------------------------- the report board

REPORTS = "reports"  # the staging sub-folder where tasks publish their part reports
_REPORT_RE = re.compile(r"^u(\d+)-r(\d+)-n(\d+)-a(\d+)\.json$")


def report_name(unit: int, start: int, rows: int, attempt: int) -> str:
    """`u<unit>-r<first row>-n<rows>-a<attempt>.json`: zero-padded, so names sort by unit, then row."""
    return f"u{unit:06d}-r{start:010d}-n{rows:010d}-a{attempt:012d}.json"


def chain(names: list[str], start: int = 0) -> tuple[list[str], int]:
    """Of one unit's report names, those that follow on from row `start`, each where the previous ended,
    and the row the chain ends at. Where two attempts published a file from the same row, the first
    name in sorted order is taken (the task and the driver choose alike)."""
    by_start: dict[int, tuple[int, str]] = {}
    for name in sorted(names):
        found = _REPORT_RE.match(name)
        if found:
            by_start.setdefault(int(found.group(2)), (int(found.group(3)), name))
    taken, row = [], start
    while row in by_start and by_start[row][0] > 0:
        rows, name = by_start[row]
        taken.append(name)
        row += rows
    return taken, row


class ReportBoard:
    """Part reports published under `<staging>/reports/` by tasks as their files are complete (see the
    module docstring): written by the executors, read and removed by the driver."""

    def __init__(self, staging: str, storage: StorageOptions):
        self.fs, root = fsspec_filesystem(staging, storage)
        self.root = posixpath.join(root, REPORTS)

    def names(self, unit: int | None = None) -> list[str]:
        """The published report names (of one unit), sorted; none before the first is published."""
        self.fs.invalidate_cache(self.root)  # s3fs caches listings: a poll must see new files
        try:
            listing = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        prefix = f"u{unit:06d}-" if unit is not None else ""
        return sorted(n for n in map(posixpath.basename, listing) if _REPORT_RE.match(n) and n.startswith(prefix))

    def publish(self, unit: int, start: int, attempt: int, report: dict[str, Any]) -> None:
        """Publish one complete file's report: written aside, then moved into place (seen whole or not at all)."""
        path = posixpath.join(self.root, report_name(unit, start, report["rows"], attempt))
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(path + ".tmp", json.dumps(report).encode())
        self.fs.mv(path + ".tmp", path)

    def read(self, name: str) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(posixpath.join(self.root, name)))

    def remove(self, names: list[str]) -> None:
        if names:
            self.fs.rm([posixpath.join(self.root, name) for name in names])


class ReportChains:
    """Driver side: each unit's published reports, taken once each, in row order (`chain`)."""

    def __init__(self, board: ReportBoard):
        self.board = board
        self.rows: dict[int, int] = defaultdict(int)  # per unit: rows of the unit taken so far
        self.done: set[int] = set()

    def poll(self) -> list[dict[str, Any]]:
        """The reports published since the last poll that follow on from what was taken, in order."""
        by_unit: dict[int, list[str]] = defaultdict(list)
        for name in self.board.names():
            by_unit[int(_REPORT_RE.match(name).group(1))].append(name)
        reports = []
        for unit, names in sorted(by_unit.items()):
            if unit in self.done:
                continue
            taken, self.rows[unit] = chain(names, self.rows[unit])
            reports += [self.board.read(name) for name in taken]
        return reports

    def finish(self, tails: list[dict[str, Any]]) -> None:
        """A wave's job ended: every unit's chain must reach its last attempt's end; its reports go."""
        names = self.board.names()
        for tail in tails:
            unit = tail["unit"]
            if self.rows[unit] != tail["rows_end"]:
                raise RuntimeError(
                    f"spark: unit {unit}: its published part reports reach row {self.rows[unit]} of "
                    f"{tail['rows_end']}; the rows from there were not committed (run again with "
                    "output.mode: resume to complete them)"
                )
            self.done.add(unit)
        self.board.remove([n for n in names if int(_REPORT_RE.match(n).group(1)) in self.done])


# ---------------------------------------------------------------------------- executor side


def annotate_unit(unit: dict, index: int, plan: ResolvedJob, input_schema: pa.Schema, staging: str,
                  resume: ResumeFilter, attempt: int = 0, cut_seconds: float = 0.0) -> Iterator[dict]:
    """Executor side: read one unit, drop committed ids, run the stages, publish its part files as they complete.

    The one per-batch loop (`annotate_stream`) runs the stages: reading and CPU
    stages overlap the model. Each complete file's report is published on the
    `ReportBoard`; the open file is closed once it has taken rows for
    `cut_seconds` (0: only at `rows_per_file`). Rows an earlier attempt of this
    unit published are not read again. What the task holds is a few model
    batches and one open file, whatever the unit's size. Yields one tail report
    (`TAIL_SCHEMA`): rows skipped, seconds per phase, the model's waits, the row it ended at.
    """
    cfg: InputConfig = plan.cfg.input
    backend = cached_backend(plan)
    board = ReportBoard(staging, plan.cfg.output.storage)
    first = chain(board.names(index))[1]  # rows an earlier attempt published: done (staged, maybe committed)
    row = first  # the unit's rows (after the resume filter) published so far
    skipped = 0
    times = PhaseTimes()  # this task's seconds per phase, sent with its tail
    leftover: list[dict] = []  # reports without a file (model seconds booked after the last file)

    def pending() -> Iterator[pa.RecordBatch]:  # runs on the loop's reader thread
        nonlocal skipped
        drop = first
        for batch in read_unit(unit, cfg, input_schema, cfg.read_batch_rows):
            batch, dropped = resume.apply(with_ids(batch, cfg.id_column, plan.image_column, plan.uri_column))
            skipped += dropped
            if drop:
                cut = min(drop, batch.num_rows)
                batch, drop = batch.slice(cut), drop - cut
            yield batch

    def segment() -> StagedParts:
        # The tag names the attempt and the first row: a retry never rewrites a file another attempt published.
        return StagedParts(plan, staging, f"u{index:06d}-a{attempt}-r{row:010d}")

    def publish(reports: list[dict]) -> bool:
        nonlocal row
        for report in reports:
            if report["file"]:
                board.publish(index, row, attempt, report)
                row += report["rows"]
            else:
                leftover.append(report)
        return any(report["file"] for report in reports)

    parts, opened = segment(), None
    clock = ModelClock()
    stream = annotate_stream(pending(), plan, backend, io_threads=task_io_threads(plan.cfg.engine),
                             prefetch_batches=plan.cfg.engine.prefetch_batches, times=times, clock=clock)
    with contextlib.closing(stream):
        for annotated in stream:
            # Collect only while this task works: a generator's context would leak into the consumer's.
            with collecting(times):
                opened = opened or time.monotonic()
                if publish(parts.write(annotated.batch, model_seconds=annotated.model_seconds)):
                    opened = time.monotonic()  # a new file holds what was left of the batch
                if cut_seconds and time.monotonic() - opened >= cut_seconds:
                    publish(parts.close())
                    parts, opened = segment(), None
    with collecting(times):
        publish(parts.close())
    tail = part_report(0, skipped=skipped, model_seconds=sum(r["model_seconds"] for r in leftover),
                       phases=times.as_dict())
    yield {**tail, "model_input_wait_seconds": clock.input_wait_seconds,
           "model_output_wait_seconds": clock.output_wait_seconds, "unit": index, "rows_end": row}


def task_io_threads(engine: EngineConfig) -> int:
    """`engine.io_threads`, or one: a Spark task has one core of its own, the other tasks run on the others."""
    return engine.io_threads or 1


def waves(units: list, size: int) -> Iterator[list]:
    """`units` in consecutive groups of `size` (one Spark job each)."""
    for start in range(0, len(units), size):
        yield units[start:start + size]


def poll_seconds(commit_every_s: float) -> float:
    """How often the driver looks for published reports: often enough for the time rule, at most once a second."""
    return max(0.1, min(1.0, commit_every_s / 4)) if commit_every_s else 1.0


# ---------------------------------------------------------------------------- driver side


class SparkEngine(Engine):
    """Spark: one task per unit of the input on the executors (`mapInArrow`); the driver commits.

    Units go to Spark in waves, one job per wave with a task per unit, and two
    jobs are in flight at once (submitted from two driver threads), so every
    executor stays busy while the previous wave ends. A wave holds
    `engine.partitions` units (default: four times the cluster's cores). The
    driver takes the files' reports as the tasks publish them (see the module docstring).
    """

    name = "spark"

    def check(self, cfg: JobConfig, backend) -> None:
        super().check(cfg, backend)
        check_no_speculation(cfg.engine.spark_conf)

    @contextlib.contextmanager
    def session(self, run: Run, backend) -> Iterator[object]:
        spark = spark_session(run.cfg.engine, f"vb-batch {run.plan.run_id}")
        check_no_speculation(spark.sparkContext.getConf())  # a cluster's defaults may turn it on
        from vb_batch.models.quota_share import driver_rate_limiter

        with driver_rate_limiter(run.plan, spark.sparkContext.getConf()):  # a hosted model's limits, run-wide
            yield spark

    def execute(self, run: Run, spark) -> None:
        from pyspark.sql.pandas.types import from_arrow_schema

        cfg, plan = run.cfg, run.plan
        units = run.source.units(max_rows=cfg.engine.unit_rows)
        wave_size = cfg.engine.partitions or 4 * spark.sparkContext.defaultParallelism
        log.info("run %s on spark: %d units in waves of %d", plan.run_id, len(units), wave_size)
        run.summary.model_seconds = 0.0  # summed over the executors' units, as are the waits
        run.summary.model_input_wait_seconds = run.summary.model_output_wait_seconds = 0.0
        # Plain values only in the closure: the plan, the schema, the staging URL, the committed ids.
        resume = spark.sparkContext.broadcast(run.resume)
        input_schema, staging = run.source.dataset.schema, run.sink.staging
        schema = from_arrow_schema(TAIL_SCHEMA)
        profile = gpu_profile(cfg.engine)
        cut_seconds = cfg.output.commit_every_s / 2  # the driver's commit adds at most the other half
        chains = ReportChains(ReportBoard(staging, cfg.output.storage))

        def work(batches):
            from pyspark import TaskContext

            context = TaskContext.get()
            attempt = context.taskAttemptId() if context is not None else 0
            for batch in batches:
                for index, spec in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    for tail in annotate_unit(json.loads(spec), index, plan, input_schema, staging, resume.value,
                                              attempt, cut_seconds):
                        yield pa.RecordBatch.from_pylist([tail], schema=TAIL_SCHEMA)

        def run_wave(first: int, wave: list) -> list:
            # One partition per unit, made where the rows are (a repartition would add a shuffle per wave).
            rows = spark.sparkContext.parallelize([(first + i, json.dumps(u)) for i, u in enumerate(wave)], len(wave))
            frame = spark.createDataFrame(rows, "unit long, spec string")
            mapped = frame.mapInArrow(work, schema, **({"profile": profile} if profile else {}))
            return mapped.collect()

        with ThreadPoolExecutor(2, thread_name_prefix="vb-spark-job") as jobs, ThreadPoolExecutor(
            1, thread_name_prefix="vb-spark-compact"
        ) as merges:
            # A unit's last file is short, as are files cut by the time rule: the compactor merges them into
            # files of rows_per_file rows, here on the driver (the staging directory is the sink's, reachable
            # here): a one-task Spark job would wait for a free executor, holding the time rule's commit back.
            compactor = Compactor(run, lambda names, tag: merges.submit(compact, plan, staging, names, tag))
            in_flight: deque[Future] = deque()
            for n, wave in enumerate(waves(units, wave_size)):
                in_flight.append(jobs.submit(run_wave, n * wave_size, wave))
                if len(in_flight) >= 2:
                    self._drain(run, compactor, chains, in_flight.popleft(), poll_seconds(cfg.output.commit_every_s))
            while in_flight:
                self._drain(run, compactor, chains, in_flight.popleft(), poll_seconds(cfg.output.commit_every_s))
            compactor.finish()

    @staticmethod
    def _drain(run: Run, compactor: Compactor, chains: ReportChains, job: Future, every: float) -> None:
        """Take published reports until `job` (a wave) ends, then its last ones and its tails."""
        while not job.done():
            futures_wait([job], timeout=every)
            for report in chains.poll():
                compactor.add(report)
        tails = [row.asDict(recursive=True) for row in job.result()]
        for report in chains.poll():  # what the wave's tasks published last
            compactor.add(report)
        chains.finish(tails)
        for tail in tails:
            run.summary.add_model_waits(tail)
            compactor.add({key: tail[key] for key in PART_SCHEMA.names})
