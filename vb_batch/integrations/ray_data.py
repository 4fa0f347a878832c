"""vb_batch inside your own Ray Data pipeline: `Annotator`, a callable class for `Dataset.map_batches`.

Each actor builds the model once and runs the three stages (fetch + decode,
model, decode + encode) on every batch it is given, through the one per-batch
loop (`vb_batch.pipeline.loop`; decoding the batch's next model batch overlaps
the model's call on the one before): the rows come back with
all their columns plus the output columns of a vb_batch job (same names,
types and field metadata). Read, filter, join and write around it as you
like. For a whole job (read, resume, atomic commit) use `engine.kind: ray`
instead.

Example (runs as is on a laptop; on a GPU cluster give `num_gpus=1` and a real model):

>>> import io
>>> import numpy as np
>>> import ray
>>> from PIL import Image
>>> from ray.data import ActorPoolStrategy
>>> from vb_batch.integrations.ray_data import Annotator
>>> def png(grey):
...     buffer = io.BytesIO()
...     Image.fromarray(np.full((32, 48, 3), grey, np.uint8)).save(buffer, format="PNG")
...     return buffer.getvalue()
>>> ds = ray.data.from_items([{"id": f"img-{i}", "image": png(60 * i)} for i in range(4)])
>>> config = {
...     "input": {"image_column": "image"},            # or uri_column: a column of image URIs
...     "tasks": ["depth", "normals"],
...     "model": {"backend": "identity"},              # e.g. marigold with model.path on a real job
... }
>>> labelled = ds.map_batches(
...     Annotator,
...     fn_constructor_kwargs={"config": config},
...     batch_format="pyarrow",                        # zero-copy; Ray's default (numpy) and pandas work too
...     batch_size=8,                                  # images per model call
...     compute=ActorPoolStrategy(size=1),             # actors, each holding one model
...     num_gpus=0,                                    # 1: one model per GPU
... )
>>> rows = sorted(labelled.take_all(), key=lambda row: row["id"])
>>> [row["id"] for row in rows], [row["vb_error"] for row in rows]
(['img-0', 'img-1', 'img-2', 'img-3'], [None, None, None, None])
>>> "depth_median_m" in rows[0] and "normals" in rows[0]
True
>>> labelled.write_parquet("s3://bucket/labels/", filesystem=...)   # doctest: +SKIP

`vb_batch.ray.Annotator` is the same class (its old import path).
`config` is a job config (dict, YAML path or `JobConfig`); of its `input`
section only the column names and the image limits matter (`input.path` may be
left out). A URI column may name local files only, unless
`input.allowed_prefixes` lists others (e.g. `["s3://bucket/images/"]`).
Pass the same `run_id` to every actor (`fn_constructor_kwargs`) to give all
rows one provenance run id; by default each actor makes its own.

Batches come in whatever `batch_format` you choose: `"pyarrow"` (zero-copy,
best), Ray's default (a dict of numpy arrays) or `"pandas"`; they go back as
Arrow tables (Ray accepts any format back), which keep the output columns'
field metadata (what `vb_batch.load_arrays` reads). The image column must hold
encoded image bytes (PNG, JPEG, ...), not decoded pixels: read files with
`ray.data.read_binary_files`, not `ray.data.read_images`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vb_batch.config import ConfigError, JobConfig, load_config
from vb_batch.engines.ray import record_batch
from vb_batch.io.outputs import as_arrow_table
from vb_batch.io.sources import with_ids
from vb_batch.models.base import create_backend
from vb_batch.pipeline.loop import annotate_batch
from vb_batch.pipeline.model import check_backend
from vb_batch.pipeline.resolved import ResolvedJob, new_run_id

__all__ = ["Annotator"]


def _job_config(config: str | Path | dict[str, Any] | JobConfig, overrides: list[str] | None) -> JobConfig:
    if isinstance(config, JobConfig):
        return config
    if not isinstance(config, dict):
        return load_config(config, overrides)
    data = copy.deepcopy(config)
    # Rows come from the pipeline; the path only sets which URI scheme may be fetched (local files).
    data.setdefault("input", {}).setdefault("path", ".")
    return load_config(data, overrides)


class Annotator:
    """Adds vb_batch output columns to Ray Data batches; see the module docstring for an example."""

    def __init__(
        self,
        config: str | Path | dict[str, Any] | JobConfig,
        overrides: list[str] | None = None,
        run_id: str | None = None,
    ):
        self.cfg = _job_config(config, overrides)
        if not (self.cfg.input.image_column or self.cfg.input.uri_column):
            raise ConfigError("input.image_column: name the column of image bytes (or input.uri_column, of URIs)")
        self.run_id = run_id or new_run_id()
        self.backend = create_backend(self.cfg.model)
        self._plans: dict[pa.Schema, ResolvedJob] = {}
        self._schema: pa.Schema | None = None  # the first batch's: later numpy/pandas batches are cast to it

    def _plan(self, schema: pa.Schema) -> ResolvedJob:
        """The resolved job for batches of `schema` (id column included), built once per schema."""
        if schema not in self._plans:
            plan = ResolvedJob.build(self.cfg, schema, self.cfg.input.image_column, self.cfg.input.uri_column, run_id=self.run_id)
            check_backend(plan, self.backend)
            self._plans[schema] = plan
        return self._plans[schema]

    def __call__(self, batch: Any) -> pa.Table:
        """Annotate one batch (pyarrow Table, dict of numpy arrays or pandas DataFrame); an Arrow table back."""
        table = self._arrow(batch)
        inp = self.cfg.input
        column = inp.image_column or inp.uri_column
        if column not in table.schema.names:
            key = "input.image_column" if inp.image_column else "input.uri_column"
            raise ConfigError(f"{key}: column {column!r} not in the batch; columns: {table.schema.names}")
        kind = table.schema.field(column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind) or pa.types.is_struct(kind) or pa.types.is_null(kind)):
            key = "input.image_column" if inp.image_column else "input.uri_column"
            raise ConfigError(
                f"{key}: column {column!r} holds {kind}, not encoded images ({'bytes' if inp.image_column else 'URIs'}); "
                "decoded pixels (ray.data.read_images) are not taken: read the files with "
                "ray.data.read_binary_files(paths, include_paths=True) and set input.image_column: bytes"
            )
        batch = with_ids(record_batch(table), inp.id_column, inp.image_column, inp.uri_column)
        return pa.Table.from_batches([annotate_batch(batch, self._plan(batch.schema), self.backend)])

    def _arrow(self, batch: Any) -> pa.Table:
        """Any of Ray's batch formats as an Arrow table, typed like the first batch seen."""
        if isinstance(batch, dict):  # Ray's default: column -> numpy array (object arrays for bytes, str)
            table = pa.table({name: _numpy_column(values) for name, values in batch.items()})
        elif hasattr(batch, "iloc"):  # pandas
            table = pa.Table.from_pandas(batch, preserve_index=False)
        else:
            table = as_arrow_table(batch)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema and table.schema.names == self._schema.names:
            # numpy and pandas batches carry no types: an all-null column comes back typed null.
            try:
                table = table.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                pass
        return table


def _numpy_column(values: Any) -> pa.Array:
    """One column of a numpy batch: 1-D arrays as they are, tensor columns (N, ...) as nested lists."""
    values = np.asarray(values)
    if values.ndim > 1:
        return pa.array(values.tolist())
    return pa.array(values if values.dtype != object else values.tolist())
