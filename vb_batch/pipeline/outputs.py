"""Stage 3 (CPU): the model's answers -> the output columns of a batch.

    decode_encode:  answers -> values through the task's codec (or native values) -> resized
                    to the stored grid -> storage encoding (PNG or array), confidence, summary
                    scalars, provenance; internal columns dropped; rows in parallel

The batch that comes out has exactly `ResolvedJob.output_schema()`: the kept
input columns, then the output columns. A row whose answer cannot be decoded
or encoded gets `vb_error` (`output_error`) and null outputs; its input
columns stay.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vb_batch._version import __version__
from vb_batch.codecs import Decoded
from vb_batch.codecs import normals as normals_codec
from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.encodings import encode_map
from vb_batch.pipeline.columns import (
    IMAGE_COLUMN,
    IMAGE_SIZE_COLUMN,
    USAGE_COLUMN,
    USAGE_OUTPUT_COLUMN,
    answer_column,
    array_cells,
    column_values,
    confidence_column,
    row_errors,
)
from vb_batch.pipeline.grid import (
    grid_metadata,
    image_size_columns,
    resize_values,
    stored_grid,
)
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.rows import map_rows, output_error
from vb_batch.tasks import Task
from vb_batch.timing import phase

__all__ = ["decode_answer", "decode_encode"]


def decode_answer(task: Task, answers: list[np.ndarray], plan: ResolvedJob, confidences: list | None = None) -> Decoded:
    """One row's answers (one per pass) -> the values to store: native values, decoded passes, or paintings."""
    if task.name in plan.native_tasks:
        values = answers[0].astype(np.float32)
        if task.kind == "normals":
            # Native normals come in the OpenGL frame (Marigold's); store them in the configured one.
            values = normals_codec.convert(values, "opengl", plan.ctx.frame)
        return Decoded(values=values, confidence=None)
    if plan.decodes_on_device(task):
        return task.combine([Decoded(v, c) for v, c in zip(answers, confidences)], plan.ctx)
    return task.decode(answers, plan.ctx)


def decode_encode(batch: pa.RecordBatch, plan: ResolvedJob) -> pa.RecordBatch:
    """Stage 3 (CPU): decode answers, encode for storage, add summaries and provenance; rows in parallel.

    Summary scalars are computed on the decoded map at the grid the model answered at, before
    any resize: the same values whatever `output.resolution` / `output.max_side` store.
    """
    errors = row_errors(batch)
    output = plan.cfg.output
    sizes = _image_sizes(batch)
    encoding = output.encoding
    outputs: dict[str, list[Any]] = {f.name: [None] * batch.num_rows for f in plan.output_fields()}
    if grid_metadata(output):
        for name, axis in zip(image_size_columns(output), (0, 1)):
            outputs[name] = [None if size is None else size[axis] for size in sizes]
    work = []
    for task in plan.tasks:
        num_passes = task.passes(plan.ctx)
        passes = [array_cells(batch, answer_column(task.name, p)) for p in range(num_passes)]
        pass_confidences = (
            [array_cells(batch, confidence_column(task.name, p)) for p in range(num_passes)]
            if plan.decodes_on_device(task)
            else None
        )
        work.append((task, task.column_meta(plan.ctx, encoding), passes, pass_confidences))

    def encode_row(i: int) -> tuple[dict[str, Any], dict[str, str] | None]:
        """One row's output cells for every task, in task order; the first failing task ends the row."""
        cells: dict[str, Any] = {}
        for task, meta, passes, pass_confidences in work:
            try:
                with phase("codec_decode"):
                    confidences = None if pass_confidences is None else [c[i] for c in pass_confidences]
                    decoded = decode_answer(task, [answers[i] for answers in passes], plan, confidences)
                    values = np.asarray(decoded.values)
                with phase("encode"):
                    summary = task.summarise(values, plan.ctx)
                    confidence = None if decoded.confidence is None else float(np.mean(decoded.confidence))
                with phase("resize"):
                    values = resize_values(values, task.kind, stored_grid(output, sizes[i], values.shape[:2]))
                with phase("encode"):
                    cell = encode_map(values, meta, output.png_compression)
            except Exception as exc:  # noqa: BLE001 - a bad answer is this row's fault
                return cells, output_error(task.name, exc)
            cells[plan.column(task)] = cell
            cells[plan.column(task, "_confidence")] = confidence
            cells.update({plan.column(task, suffix): value for suffix, value in summary.items()})
        return cells, None

    rows = [i for i in range(batch.num_rows) if errors[i] is None and sizes[i] is not None]
    for i, (cells, error) in zip(rows, map_rows(encode_row, rows)):
        for name, value in cells.items():
            outputs[name][i] = value
        errors[i] = error
    outputs[ERROR_COLUMN] = errors
    provenance = {"vb_model": plan.model, "vb_profile": plan.profile, "vb_run_id": plan.run_id, "vb_version": __version__}
    for name, value in provenance.items():
        outputs[name] = [value] * batch.num_rows
    if USAGE_OUTPUT_COLUMN in outputs and batch.schema.get_field_index(USAGE_COLUMN) >= 0:
        outputs[USAGE_OUTPUT_COLUMN] = column_values(batch, USAGE_COLUMN)
    schema = plan.output_schema()
    kept = [batch.column(batch.schema.get_field_index(f.name)) for f in plan.kept_input_fields()]
    produced = [pa.array(outputs[f.name], type=f.type) for f in plan.output_fields()]
    return pa.RecordBatch.from_arrays(kept + produced, schema=schema)


def _image_sizes(batch: pa.RecordBatch) -> list[tuple[int, int] | None]:
    """Each row's whole-image (height, width): `IMAGE_SIZE_COLUMN`, else its decoded pixels' shape."""
    if batch.schema.get_field_index(IMAGE_SIZE_COLUMN) >= 0:
        return [None if size is None else tuple(size) for size in column_values(batch, IMAGE_SIZE_COLUMN)]
    # Only the shapes: reading the whole struct would copy every image's raw pixels into Python.
    shapes = pc.struct_field(batch.column(batch.schema.get_field_index(IMAGE_COLUMN)), "shape").to_pylist()
    return [None if shape is None else tuple(shape[:2]) for shape in shapes]
