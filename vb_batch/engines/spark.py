"""The Spark engine: the same stages in Spark's Python workers, the commit on the driver.

    driver:    list the input as units (row groups / listing slices) -> a DataFrame, one row a unit
    executors: mapInArrow: read the unit (pyarrow, any fsspec URL) -> fetch_decode -> run_model
               (the model cached once per Python worker) -> decode_encode -> write a staged
               Parquet file into the sink's staging dir -> yield (file, rows, error codes)
    driver:    stage each file in the ParquetSink and commit (records, then moves; `_SUCCESS` last)

Reading and writing happen on the Python side on purpose: the pyspark wheel
has no s3a connector (and no JARs can be fetched), and Spark's own Parquet
writer drops the Arrow field metadata (`vb.unit`, `vb.scale`, `vb.legend`, ...)
that makes the output self-describing. This way local, Ray and Spark write
byte-for-byte the same schema. Staged file names are fixed per unit, so a
retried or speculative task attempt rewrites the same file instead of adding
rows. Users' own DataFrames go through `vb_batch.spark.annotate` instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
import pyarrow as pa

from vb_batch.config import EngineConfig, JobConfig, redacted
from vb_batch.engines.local import rebatch
from vb_batch.io.sinks import open_sink, write_part
from vb_batch.io.sources import open_source, read_unit, with_ids
from vb_batch.job import RunSummary, tracked_run
from vb_batch.models.base import ModelBackend, create_backend
from vb_batch.stages import ERROR_COLUMN, Plan, check_backend, decode_encode, fetch_decode, run_model

log = logging.getLogger(__name__)

RESULT_SCHEMA = "file string, rows long, skipped long, error_codes string, model_seconds double"
RESULT = pa.schema(
    [("file", pa.string()), ("rows", pa.int64()), ("skipped", pa.int64()), ("error_codes", pa.string()),
     ("model_seconds", pa.float64())]
)

# One model per Python worker process, kept across tasks (Spark reuses Python workers).
_MODELS: dict[str, ModelBackend] = {}


def cached_backend(plan: Plan) -> ModelBackend:
    key = plan.cfg.model.model_dump_json()
    if key not in _MODELS:
        backend = create_backend(plan.cfg.model)
        check_backend(plan, backend)
        _MODELS[key] = backend
    return _MODELS[key]


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


def annotate_units(
    units: Iterator[pa.RecordBatch], plan: Plan, input_schema: pa.Schema, staging: str, done: frozenset
) -> Iterator[pa.RecordBatch]:
    """Executor side: annotate every unit in the stream and write it as staged Parquet files."""
    cfg = plan.cfg
    backend = cached_backend(plan)
    for batch in units:
        for unit_index, unit_json in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            unit = json.loads(unit_json)
            batches = [
                with_ids(b, cfg.input.id_column, plan.image_column, plan.uri_column)
                for b in read_unit(unit, cfg.input, input_schema, cfg.input.read_batch_rows)
            ]
            read = sum(b.num_rows for b in batches)
            if done:
                batches = [b.filter(pa.array([i not in done for i in b.column(0).to_pylist()])) for b in batches]
            outputs, model_seconds = [], 0.0
            for b in rebatch((b for b in batches if b.num_rows), cfg.model.batch_size):
                decoded = fetch_decode(b, plan)
                started = time.perf_counter()
                answered = run_model(decoded, plan, backend)
                model_seconds += time.perf_counter() - started
                outputs.append(decode_encode(answered, plan))
            table = pa.Table.from_batches(outputs, schema=plan.output_schema())
            skipped = read - table.num_rows
            if table.num_rows == 0:
                yield pa.RecordBatch.from_pydict(
                    {"file": [None], "rows": [0], "skipped": [skipped], "error_codes": ["[]"],
                     "model_seconds": [model_seconds]},
                    schema=RESULT,
                )
            for part, start in enumerate(range(0, table.num_rows, cfg.output.rows_per_file)):
                piece = table.slice(start, cfg.output.rows_per_file)
                name = f"part-{plan.run_id}-u{unit_index:06d}-{part:03d}.parquet"
                write_part(cfg.output, f"{staging}/{name}", piece)
                codes = [e and e["code"] for e in piece.column(ERROR_COLUMN).to_pylist()]
                yield pa.RecordBatch.from_pydict(
                    {"file": [name], "rows": [piece.num_rows], "skipped": [skipped if part == 0 else 0],
                     "error_codes": [json.dumps(codes)], "model_seconds": [model_seconds if part == 0 else 0.0]},
                    schema=RESULT,
                )


def run_spark(cfg: JobConfig, backend: ModelBackend | None = None) -> RunSummary:
    if backend is not None:
        raise ValueError("engine.kind: spark loads the model in each executor; pass a backend only to the local engine")
    started = time.perf_counter()
    source = open_source(cfg.input)
    plan = Plan.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    sink = open_sink(cfg.output, plan.run_id, plan.output_schema(), source.id_column)
    summary = RunSummary(run_id=plan.run_id, output=cfg.output.name, engine="spark")
    sink.check_mode()
    done = frozenset(sink.open())
    units = source.units()
    log.info("run %s on spark: %d units; %s", plan.run_id, len(units), redacted(cfg))
    spark = spark_session(cfg.engine, f"vb-batch {plan.run_id}")
    # Rows as units finish on the executors (Spark's own stage bar shows tasks).
    summary.model_seconds = 0.0  # summed over the executors' units
    with tracked_run(cfg, sink, summary, started, source.count_rows()) as advance:
        frame = spark.createDataFrame(
            [(i, json.dumps(u)) for i, u in enumerate(units)], "unit long, spec string"
        ).repartition(cfg.engine.partitions or max(1, len(units)))
        done_ids = spark.sparkContext.broadcast(done) if done else None
        input_schema = source.dataset.schema

        def work(batches):
            return annotate_units(batches, plan, input_schema, sink.staging, done_ids.value if done_ids else frozenset())

        profile = gpu_profile(cfg.engine)
        mapped = frame.mapInArrow(work, RESULT_SCHEMA, **({"profile": profile} if profile else {}))
        for row in mapped.toLocalIterator():
            summary.count_errors(json.loads(row["error_codes"]))
            summary.rows_skipped += row["skipped"]
            summary.rows_read += row["rows"] + row["skipped"]
            summary.model_seconds += row["model_seconds"]
            if row["file"]:
                sink.stage(row["file"], row["rows"])
            advance(row["rows"] + row["skipped"])
    return summary
