"""The columns a batch carries between stages, and reading and writing them.

Between stages a batch keeps its input columns and gains internal ones (all
dropped by `decode_encode`): the decoded image (`_vb_rgb`), the whole image's
size (`_vb_image_size`), the model's answers (`_vb_answer_<task>_<pass>`) and,
when paintings are decoded on the model's device, their confidence. Arrays
travel as the `array` storage struct (shape, dtype, bytes), so a batch can
cross process boundaries (Ray, Spark) unchanged. `vb_error` holds one
`{code, message}` per failed row, null for a row that is fine so far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from vb_batch.errors import ERROR_COLUMN
from vb_batch.io.encodings import column_to_arrays

__all__ = [
    "HOSTED_STATE_DIR",
    "IMAGE_COLUMN",
    "IMAGE_SIZE_COLUMN",
    "IMAGE_SIZE_TYPE",
    "PROVENANCE_COLUMNS",
    "USAGE_COLUMN",
    "USAGE_OUTPUT_COLUMN",
    "USAGE_TYPE",
    "answer_column",
    "array_cells",
    "column_values",
    "confidence_column",
    "row_errors",
    "set_column",
]

IMAGE_COLUMN = "_vb_rgb"
# The whole upright image's (height, width): the decoded pixels may be a reduced JPEG decode.
IMAGE_SIZE_COLUMN = "_vb_image_size"
IMAGE_SIZE_TYPE = pa.list_(pa.int32())
PROVENANCE_COLUMNS = ("vb_model", "vb_profile", "vb_run_id", "vb_version")
# Hosted models: the tokens the service billed for the row (all its tasks and passes) and their cost in
# US$ at the model's token prices (null when unknown). Between stages as `_vb_usage`, stored as `vb_usage`.
USAGE_COLUMN = "_vb_usage"
USAGE_OUTPUT_COLUMN = "vb_usage"
USAGE_TYPE = pa.struct([pa.field("input_tokens", pa.int64()), pa.field("output_tokens", pa.int64()),
                        pa.field("thought_tokens", pa.int64()), pa.field("cost", pa.float64())])
# Under the output: where hosted backends record their remote jobs (`ModelBackend.needs_state_dir`).
HOSTED_STATE_DIR = "_vb/hosted"


def answer_column(task: str, pass_index: int) -> str:
    return f"_vb_answer_{task}_{pass_index}"


def confidence_column(task: str, pass_index: int) -> str:
    """Per-pixel confidence of a pass decoded in the model worker (`model.decode_on_device`)."""
    return f"_vb_confidence_{task}_{pass_index}"


def column_values(batch: pa.RecordBatch, name: str) -> list[Any]:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


def set_column(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    """The batch with column `name` replaced by `values`, or appended when it has none."""
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, values)
    return batch.append_column(name, values)


def row_errors(batch: pa.RecordBatch) -> list[dict[str, str] | None]:
    """Each row's `vb_error` cell so far (all None before the first stage)."""
    if batch.schema.get_field_index(ERROR_COLUMN) < 0:
        return [None] * batch.num_rows
    return column_values(batch, ERROR_COLUMN)


def array_cells(batch: pa.RecordBatch, name: str) -> list[np.ndarray | None]:
    """An array column's cells as read-only numpy views of the batch's buffers."""
    return column_to_arrays(batch.column(batch.schema.get_field_index(name)))
