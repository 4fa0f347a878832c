"""The old home of the stages: they live in `vb_batch.pipeline` now (see its module map); these names stay.

`Plan` is `vb_batch.pipeline.resolved.ResolvedJob`.
"""

from __future__ import annotations

from vb_batch.config import ConfigError as ConfigError
from vb_batch.errors import ERROR_COLUMN as ERROR_COLUMN
from vb_batch.errors import ERROR_TYPE as ERROR_TYPE
from vb_batch.errors import RowError as RowError
from vb_batch.pipeline.columns import HOSTED_STATE_DIR as HOSTED_STATE_DIR
from vb_batch.pipeline.columns import IMAGE_COLUMN as IMAGE_COLUMN
from vb_batch.pipeline.columns import IMAGE_SIZE_COLUMN as IMAGE_SIZE_COLUMN
from vb_batch.pipeline.columns import IMAGE_SIZE_TYPE as IMAGE_SIZE_TYPE
from vb_batch.pipeline.columns import PROVENANCE_COLUMNS as PROVENANCE_COLUMNS
from vb_batch.pipeline.columns import answer_column as answer_column
from vb_batch.pipeline.columns import confidence_column as confidence_column
from vb_batch.pipeline.grid import grid_metadata as grid_metadata
from vb_batch.pipeline.grid import image_size_columns as image_size_columns
from vb_batch.pipeline.grid import resize_values as resize_values
from vb_batch.pipeline.grid import stored_grid as stored_grid
from vb_batch.pipeline.inputs import fetch_decode as fetch_decode
from vb_batch.pipeline.inputs import model_resolution as model_resolution
from vb_batch.pipeline.inputs import needed_size as needed_size
from vb_batch.pipeline.loop import annotate_batch as annotate_batch
from vb_batch.pipeline.loop import annotate_stream as annotate_stream
from vb_batch.pipeline.model import ModelBatcher as ModelBatcher
from vb_batch.pipeline.model import check_backend as check_backend
from vb_batch.pipeline.model import decode_on_device as decode_on_device
from vb_batch.pipeline.model import group_window as group_window
from vb_batch.pipeline.model import is_out_of_memory as is_out_of_memory
from vb_batch.pipeline.model import model_answer as model_answer
from vb_batch.pipeline.model import model_rows_at_once as model_rows_at_once
from vb_batch.pipeline.model import run_model as run_model
from vb_batch.pipeline.outputs import decode_answer as decode_answer
from vb_batch.pipeline.outputs import decode_encode as decode_encode
from vb_batch.pipeline.resolved import Plan as Plan
from vb_batch.pipeline.resolved import ResolvedJob as ResolvedJob
from vb_batch.pipeline.resolved import new_run_id as new_run_id
from vb_batch.pipeline.resolved import row_seed as row_seed
from vb_batch.pipeline.rows import ROW_THREADS as ROW_THREADS
from vb_batch.pipeline.rows import map_rows as map_rows
from vb_batch.pipeline.rows import row_error as row_error

__all__ = [
    "ERROR_COLUMN",
    "ERROR_TYPE",
    "HOSTED_STATE_DIR",
    "IMAGE_COLUMN",
    "IMAGE_SIZE_COLUMN",
    "IMAGE_SIZE_TYPE",
    "PROVENANCE_COLUMNS",
    "ConfigError",
    "ModelBatcher",
    "Plan",
    "ResolvedJob",
    "RowError",
    "ROW_THREADS",
    "annotate_batch",
    "annotate_stream",
    "answer_column",
    "check_backend",
    "confidence_column",
    "decode_answer",
    "decode_encode",
    "decode_on_device",
    "fetch_decode",
    "grid_metadata",
    "group_window",
    "image_size_columns",
    "is_out_of_memory",
    "map_rows",
    "model_answer",
    "model_resolution",
    "model_rows_at_once",
    "needed_size",
    "new_run_id",
    "resize_values",
    "row_error",
    "row_seed",
    "run_model",
    "stored_grid",
]
