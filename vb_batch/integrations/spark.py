"""vb_batch for your own Spark code: annotate a DataFrame of images inside your pipeline.

>>> from pyspark.sql import SparkSession                                    # doctest: +SKIP
>>> import vb_batch.integrations.spark    # also importable as vb_batch.spark
>>> spark = SparkSession.builder.getOrCreate()                               # doctest: +SKIP
>>> images = spark.read.parquet("s3a://lake/raw/images/")                    # doctest: +SKIP
>>> labelled = vb_batch.integrations.spark.annotate(images, {                             # doctest: +SKIP
...     "input": {"image_column": "image", "id_column": "id"},
...     "tasks": ["depth", "normals"],
...     "model": {"backend": "marigold", "path": "/models/marigold-depth"},
... }, persist=True)                                  # the model runs once for the actions below
>>> labelled.select("id", "depth_median_rel", "vb_error").show()            # doctest: +SKIP
>>> labelled.write.parquet("s3a://lake/labels/")                             # doctest: +SKIP
>>> depths = vb_batch.load_arrays("s3a://lake/labels/", "depth", ids=[7, 2])  # doctest: +SKIP

The model is loaded once per Python worker and reused across batches; each
partition runs through the one per-batch loop (`vb_batch.pipeline.loop`), its
decoding and encoding on a thread overlapping the model, holding a few model
batches at a time whatever the partition's size. The
result is a plain, lazy DataFrame: every action on it (`show`, `count`,
`collect`, a write) runs the model again over its rows. Write it once and read
the written table back, or keep it with `annotate(..., persist=True)` (or
`.persist()` / `.cache()` yourself) before more than one action.

Spark keeps no Arrow field metadata, so the meaning of each map column (unit,
scale, frame, legend) is copied into the Spark column metadata
(`df.schema[name].metadata`), which Spark stores in its Parquet files:
`vb_batch.load_arrays("labels/", "depth")` decodes what `labelled.write.parquet("labels/")`
wrote, and `vb_batch.decode_cell(row["depth"], labelled.schema["depth"].metadata)` one cell.

The workers run the model in Python: they need a Python with vb_batch
installed. On a local session (master `local[...]`) whose workers' Python is
not configured (no `PYSPARK_PYTHON`, no `spark.pyspark.python`), `annotate`
points them at this interpreter. On a cluster, it checks once per session that
the workers' Python imports vb_batch, and otherwise fails on the driver saying
what to set. For the lake-portable output with atomic commits and resume, run
a job with `engine.kind: spark` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from vb_batch.config import ConfigError, JobConfig, load_config
from vb_batch.engines.spark import task_io_threads
from vb_batch.io.sources import with_ids
from vb_batch.pipeline.loop import annotate_stream
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.stream import cached_backend

log = logging.getLogger(__name__)

# (application id, Python) pairs whose workers were seen to import vb_batch: checked once per session.
_CHECKED: set[tuple[str, str]] = set()


def _spark_schema(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructField, StructType

    spark_schema = from_arrow_schema(schema)
    fields = []
    for arrow_field, field in zip(schema, spark_schema.fields):
        meta = {k.decode(): v.decode() for k, v in (arrow_field.metadata or {}).items()}
        fields.append(StructField(field.name, field.dataType, field.nullable, meta or None))
    return StructType(fields)


def worker_python(master: str, python: str, configured: bool, driver: str = sys.executable) -> str | None:
    """The Python the workers should run, when vb_batch should set it: this interpreter for a local
    master whose workers' Python nobody configured (Spark's default `python3` may be another Python,
    without vb_batch); None to leave it (configured by the user, or a cluster: checked instead)."""
    if configured or not master.startswith("local") or os.path.realpath(python) == os.path.realpath(driver):
        return None
    return driver


def _probe_worker(_):
    """On a worker: the versions the model stage needs (raises ImportError where vb_batch is missing)."""
    import sys

    import pyarrow

    import vb_batch

    return sys.executable, vb_batch.__version__, pyarrow.__version__


def check_worker_python(session) -> None:
    """Make the workers' Python able to run vb_batch, or fail here, on the driver, saying what to set."""
    sc = session.sparkContext
    configured = "PYSPARK_PYTHON" in os.environ or bool(sc.getConf().get("spark.pyspark.python"))
    chosen = worker_python(sc.master, sc.pythonExec, configured)
    if chosen is not None:
        log.info("Spark workers' Python: %s (was %s; set PYSPARK_PYTHON to choose another)", chosen, sc.pythonExec)
        sc.pythonExec = chosen  # what Spark hands to the Python UDFs made from now on
        return
    key = (sc.applicationId, sc.pythonExec)
    if key in _CHECKED or sc.master.startswith("local") and os.path.realpath(sc.pythonExec) == os.path.realpath(
        sys.executable
    ):
        return
    try:
        sc.parallelize([0], 1).map(_probe_worker).collect()
    except Exception as exc:  # noqa: BLE001 - Py4J wraps the workers' error: shown, with the fix
        reason = str(exc).strip().splitlines()
        hint = next((line for line in reason if "Error" in line and ("vb_batch" in line or "program" in line)), "")
        raise ConfigError(
            f"Spark workers' Python ({sc.pythonExec!r}) cannot run vb_batch{': ' + hint.strip() if hint else ''}; "
            "install vb_batch (and its dependencies) on every worker and point Spark at that Python: "
            "PYSPARK_PYTHON=/path/to/python in the environment before the session starts, or "
            "--conf spark.pyspark.python=/path/to/python (spark-submit, cluster configuration)"
        ) from None
    _CHECKED.add(key)


def annotate(
    df,
    config: str | Path | dict[str, Any] | JobConfig,
    overrides: list[str] | None = None,
    persist: bool | Any = False,
):
    """Annotate the images of `df` (an image-bytes or URI column); returns a new DataFrame.

    `config` is a job config (path, dict or `JobConfig`); its `input` section names
    the columns (`input.path` is not needed). Output columns follow the usual schema.
    The result recomputes the model on every action: `persist=True` (or a
    `pyspark.StorageLevel`) returns it persisted (memory and disk), so that the
    model runs once for `show`, `count` and a write; `unpersist()` it when done.
    """
    from pyspark.sql.pandas.types import to_arrow_schema

    if isinstance(config, dict):
        config = {**config, "input": {"path": "<dataframe>", **config.get("input", {})}}
    cfg = config if isinstance(config, JobConfig) else load_config(config, overrides)
    input_schema = to_arrow_schema(df.schema)
    image_column = cfg.input.image_column
    uri_column = cfg.input.uri_column
    if not image_column and not uri_column:
        raise ConfigError("input.image_column: set input.image_column or input.uri_column for the DataFrame")
    if cfg.input.id_column not in input_schema.names:
        input_schema = input_schema.insert(0, pa.field(cfg.input.id_column, pa.string()))
    plan = ResolvedJob.build(cfg, input_schema, image_column=image_column, uri_column=uri_column)
    output_schema = plan.output_schema()

    def work(batches):
        rows = (pa.RecordBatch.from_arrays(with_ids(batch, cfg.input.id_column, image_column, uri_column).columns,
                                           schema=input_schema) for batch in batches)
        stream = annotate_stream(rows, plan, cached_backend(plan), io_threads=task_io_threads(cfg.engine),
                                 prefetch_batches=cfg.engine.prefetch_batches)
        with contextlib.closing(stream):
            for annotated in stream:
                yield annotated.batch

    check_worker_python(df.sparkSession)
    labelled = df.mapInArrow(work, _spark_schema(output_schema))
    if persist is False or persist is None:
        return labelled
    return labelled.persist() if persist is True else labelled.persist(persist)
