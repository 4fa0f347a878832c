"""The Spark engine: the same stages in Spark's Python workers, the commit on the driver.

    driver:    list the input as units (row groups / listing slices) -> a DataFrame, one row a unit
    executors: mapInArrow: read the unit (pyarrow, any fsspec URL) -> the one per-batch loop
               (`annotate_stream`: fetch_decode and decode_encode on a thread overlapping the
               model, cached once per Python worker; rows of one working size share calls
               across the unit's batches) -> write a staged Parquet file into the sink's
               staging dir -> yield part reports (PART_SCHEMA)
    driver:    run.apply(part report): stage each file in the sink and commit (the run core)

Reading and writing happen on the Python side on purpose: the pyspark wheel
has no s3a connector (and no JARs can be fetched), and Spark's own Parquet
writer drops the Arrow field metadata (`vb.unit`, `vb.scale`, `vb.legend`, ...)
that makes the output self-describing. This way local, Ray and Spark write
byte-for-byte the same schema. Staged file names are fixed per unit, so a
retried or speculative task attempt rewrites the same file instead of adding
rows. Users' own DataFrames go through `vb_batch.integrations.spark.annotate` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from vb_batch.config import EngineConfig, InputConfig
from vb_batch.engines.core import Engine, Run
from vb_batch.engines.resume import ResumeFilter
from vb_batch.io.sinks.staging import PART_SCHEMA, Compactor, StagedParts, compact, part_report
from vb_batch.io.sources import read_unit, with_ids
from vb_batch.pipeline.loop import ModelClock, annotate_stream
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.stream import cached_backend
from vb_batch.timing import PhaseTimes, collecting

log = logging.getLogger(__name__)


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


def annotate_unit(unit: dict, index: int, plan: ResolvedJob, input_schema: pa.Schema, staging: str,
                  resume: ResumeFilter) -> Iterator[dict]:
    """Executor side: read one unit, drop committed ids, run the stages, stream its staged part files.

    The one per-batch loop (`annotate_stream`) runs the stages: reading and CPU
    stages overlap the model. It yields a part report as each file is complete;
    what the task holds is a few model batches and one open file, whatever the
    unit's size. Model seconds go with the file their rows went to; the model's waits for input
    and for output (the loop's `ModelClock`) go in a last report of their own.
    """
    cfg: InputConfig = plan.cfg.input
    backend = cached_backend(plan)
    skipped = 0
    times = PhaseTimes()  # this task's seconds per phase, sent with its last part report

    def pending() -> Iterator[pa.RecordBatch]:  # runs on the loop's reader thread
        nonlocal skipped
        for batch in read_unit(unit, cfg, input_schema, cfg.read_batch_rows):
            batch, dropped = resume.apply(with_ids(batch, cfg.id_column, plan.image_column, plan.uri_column))
            skipped += dropped
            yield batch

    # A fixed tag per unit: a retried or speculative attempt rewrites the same files.
    parts = StagedParts(plan, staging, f"u{index:06d}", times)
    clock = ModelClock()
    stream = annotate_stream(pending(), plan, backend, io_threads=task_io_threads(plan.cfg.engine),
                             prefetch_batches=plan.cfg.engine.prefetch_batches, times=times, clock=clock)
    with contextlib.closing(stream):
        for annotated in stream:
            # Collect only while this task works: a generator's context would leak into the consumer's.
            with collecting(times):
                reports = parts.write(annotated.batch, model_seconds=annotated.model_seconds)
            yield from reports
    with collecting(times):
        reports = parts.close(skipped)
    yield from reports
    yield {**part_report(0), "model_input_wait_seconds": clock.input_wait_seconds,
           "model_output_wait_seconds": clock.output_wait_seconds}


def task_io_threads(engine: EngineConfig) -> int:
    """`engine.io_threads`, or one: a Spark task has one core of its own, the other tasks run on the others."""
    return engine.io_threads or 1


def waves(units: list, size: int) -> Iterator[list]:
    """`units` in consecutive groups of `size` (one Spark job each)."""
    for start in range(0, len(units), size):
        yield units[start:start + size]


class SparkEngine(Engine):
    """Spark: one task per unit of the input on the executors (`mapInArrow`); the driver commits.

    Units go to Spark in waves, one job per wave with a task per unit, and two
    jobs are in flight at once (submitted from two driver threads), so every
    executor stays busy while the driver commits what the previous wave wrote.
    A wave holds `engine.partitions` units (default: four times the cluster's cores).
    """

    name = "spark"

    @contextlib.contextmanager
    def session(self, run: Run, backend) -> Iterator[object]:
        yield spark_session(run.cfg.engine, f"vb-batch {run.plan.run_id}")

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
        schema = from_arrow_schema(PART_SCHEMA)
        profile = gpu_profile(cfg.engine)

        def work(batches):
            for batch in batches:
                for index, spec in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    for report in annotate_unit(json.loads(spec), index, plan, input_schema, staging, resume.value):
                        yield pa.RecordBatch.from_pylist([report], schema=PART_SCHEMA)

        def run_wave(first: int, wave: list) -> list:
            # One partition per unit, made where the rows are (a repartition would add a shuffle per wave).
            rows = spark.sparkContext.parallelize([(first + i, json.dumps(u)) for i, u in enumerate(wave)], len(wave))
            frame = spark.createDataFrame(rows, "unit long, spec string")
            mapped = frame.mapInArrow(work, schema, **({"profile": profile} if profile else {}))
            return mapped.collect()

        def run_compact(names: list[str], tag: str) -> list[dict]:
            # A one-task job: the merge runs on an executor, where the staging directory is reachable.
            rows = spark.sparkContext.parallelize([0], 1)
            return rows.map(lambda _: compact(plan, staging, names, tag)).collect()[0]

        with ThreadPoolExecutor(2, thread_name_prefix="vb-spark-job") as jobs, ThreadPoolExecutor(
            1, thread_name_prefix="vb-spark-compact"
        ) as merges:
            # A unit's last file is short; the compactor merges those into files of rows_per_file rows.
            compactor = Compactor(run, lambda names, tag: merges.submit(run_compact, names, tag))
            in_flight: deque[Future] = deque()
            for n, wave in enumerate(waves(units, wave_size)):
                in_flight.append(jobs.submit(run_wave, n * wave_size, wave))
                if len(in_flight) >= 2:
                    self._apply(run, compactor, in_flight.popleft())
            while in_flight:
                self._apply(run, compactor, in_flight.popleft())
            compactor.finish()

    @staticmethod
    def _apply(run: Run, compactor: Compactor, job: Future) -> None:
        for row in job.result():
            report = row.asDict(recursive=True)
            run.summary.add_model_waits(report)
            compactor.add(report)
