"""The Spark engine: the same stages in Spark's Python workers, the commit on the driver.

    driver:    list the input as units (row groups / listing slices) -> a DataFrame, one row a unit
    executors: mapInArrow: read the unit (pyarrow, any fsspec URL) -> fetch_decode -> run_model
               (the model cached once per Python worker) -> decode_encode -> write a staged
               Parquet file into the sink's staging dir -> yield part reports (PART_SCHEMA)
    driver:    run.apply(part report): stage each file in the sink and commit (the run core)

Reading and writing happen on the Python side on purpose: the pyspark wheel
has no s3a connector (and no JARs can be fetched), and Spark's own Parquet
writer drops the Arrow field metadata (`vb.unit`, `vb.scale`, `vb.legend`, ...)
that makes the output self-describing. This way local, Ray and Spark write
byte-for-byte the same schema. Staged file names are fixed per unit, so a
retried or speculative task attempt rewrites the same file instead of adding
rows. Users' own DataFrames go through `vb_batch.spark.annotate` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

import pyarrow as pa

from vb_batch.config import EngineConfig, InputConfig
from vb_batch.engines.base import PART_SCHEMA, Engine, ResumeFilter, Run, cached_backend, rebatch, stage_parts
from vb_batch.io.sources import read_unit, with_ids
from vb_batch.stages import Plan, decode_encode, fetch_decode, run_model

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


def annotate_unit(unit: dict, index: int, plan: Plan, input_schema: pa.Schema, staging: str,
                  resume: ResumeFilter) -> list[dict]:
    """Executor side: read one unit, drop committed ids, run the stages, write its staged part files."""
    cfg: InputConfig = plan.cfg.input
    backend = cached_backend(plan)
    skipped = 0

    def pending() -> Iterator[pa.RecordBatch]:
        nonlocal skipped
        for batch in read_unit(unit, cfg, input_schema, cfg.read_batch_rows):
            batch, dropped = resume.apply(with_ids(batch, cfg.id_column, plan.image_column, plan.uri_column))
            skipped += dropped
            yield batch

    outputs, model_seconds = [], 0.0
    for batch in rebatch(pending(), plan.cfg.model.batch_size):
        decoded = fetch_decode(batch, plan)
        started = time.perf_counter()
        answered = run_model(decoded, plan, backend)
        model_seconds += time.perf_counter() - started
        outputs.append(decode_encode(answered, plan))
    table = pa.Table.from_batches(outputs, schema=plan.output_schema())
    # A fixed tag per unit: a retried or speculative attempt rewrites the same files.
    return stage_parts(plan, staging, table, f"u{index:06d}", model_seconds, skipped=skipped)


class SparkEngine(Engine):
    """Spark: one task per unit of the input on the executors (`mapInArrow`); the driver commits."""

    name = "spark"

    @contextlib.contextmanager
    def session(self, run: Run, backend) -> Iterator[object]:
        yield spark_session(run.cfg.engine, f"vb-batch {run.plan.run_id}")

    def execute(self, run: Run, spark) -> None:
        cfg, plan = run.cfg, run.plan
        units = run.source.units()
        log.info("run %s on spark: %d units", plan.run_id, len(units))
        run.summary.model_seconds = 0.0  # summed over the executors' units
        frame = spark.createDataFrame(
            [(i, json.dumps(u)) for i, u in enumerate(units)], "unit long, spec string"
        ).repartition(cfg.engine.partitions or max(1, len(units)))
        # Plain values only in the closure: the plan, the schema, the staging URL, the committed ids.
        resume = spark.sparkContext.broadcast(run.resume)
        input_schema, staging = run.source.dataset.schema, run.sink.staging

        def work(batches):
            for batch in batches:
                for index, spec in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    reports = annotate_unit(json.loads(spec), index, plan, input_schema, staging, resume.value)
                    if reports:
                        yield pa.RecordBatch.from_pylist(reports, schema=PART_SCHEMA)

        profile = gpu_profile(cfg.engine)
        from pyspark.sql.pandas.types import from_arrow_schema

        mapped = frame.mapInArrow(work, from_arrow_schema(PART_SCHEMA), **({"profile": profile} if profile else {}))
        for row in mapped.toLocalIterator():
            run.apply(row.asDict(recursive=True))
