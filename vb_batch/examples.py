"""Moved to `vb_batch.evaluation.examples` (issue 35); this old import path re-exports its names."""

from vb_batch.evaluation.examples import (
    CLASS_NAMES,
    EGO_ROWS,
    EGO_VEHICLE_LABEL_ID,
    EXAMPLES,
    KITTI_KEEP,
    NYU_BORDER_DEPTH_M,
    encode_truth,
    example_table,
    scenes_of,
)

__all__ = [
    "CLASS_NAMES",
    "EGO_ROWS",
    "EGO_VEHICLE_LABEL_ID",
    "EXAMPLES",
    "KITTI_KEEP",
    "NYU_BORDER_DEPTH_M",
    "encode_truth",
    "example_table",
    "scenes_of",
]
