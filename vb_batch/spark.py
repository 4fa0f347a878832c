"""vb_batch for your own Spark code: annotate a DataFrame of images inside your pipeline.

>>> from pyspark.sql import SparkSession                                    # doctest: +SKIP
>>> import vb_batch.spark
>>> spark = SparkSession.builder.getOrCreate()                               # doctest: +SKIP
>>> images = spark.read.parquet("s3a://lake/raw/images/")                    # doctest: +SKIP
>>> labelled = vb_batch.spark.annotate(images, {                             # doctest: +SKIP
...     "input": {"image_column": "image", "id_column": "id"},
...     "tasks": ["depth", "normals"],
...     "model": {"backend": "marigold", "path": "/models/marigold-depth"},
... })
>>> labelled.select("id", "depth_median_rel", "vb_error").show()            # doctest: +SKIP

The model is loaded once per Python worker and reused across batches. The
result is a plain DataFrame: write it with Spark as you like. Spark keeps no
Arrow field metadata, so the meaning of each map column (unit, scale, frame,
legend) is copied into the Spark column metadata (`df.schema[name].metadata`),
which Spark stores in its Parquet files. For the lake-portable output with
atomic commits and resume, run a job with `engine.kind: spark` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from vb_batch.config import ConfigError, JobConfig, load_config
from vb_batch.engines.base import cached_backend
from vb_batch.io.sources import with_ids
from vb_batch.stages import Plan, decode_encode, fetch_decode, run_model


def _spark_schema(schema: pa.Schema):
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructField, StructType

    spark_schema = from_arrow_schema(schema)
    fields = []
    for arrow_field, field in zip(schema, spark_schema.fields):
        meta = {k.decode(): v.decode() for k, v in (arrow_field.metadata or {}).items()}
        fields.append(StructField(field.name, field.dataType, field.nullable, meta or None))
    return StructType(fields)


def annotate(df, config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None = None):
    """Annotate the images of `df` (an image-bytes or URI column); returns a new DataFrame.

    `config` is a job config (path, dict or `JobConfig`); its `input` section names
    the columns (`input.path` is not needed). Output columns follow the usual schema.
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
    plan = Plan.build(cfg, input_schema, image_column=image_column, uri_column=uri_column)
    output_schema = plan.output_schema()

    def work(batches):
        backend = cached_backend(plan)
        for batch in batches:
            batch = with_ids(batch, cfg.input.id_column, image_column, uri_column)
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=input_schema)
            yield decode_encode(run_model(fetch_decode(batch, plan), plan, backend), plan)

    return df.mapInArrow(work, _spark_schema(output_schema))
