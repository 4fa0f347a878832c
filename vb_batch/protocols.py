"""Moved to `vb_batch.evaluation.protocols` (issue 35); this old import path re-exports its names."""

from vb_batch.evaluation.protocols import (
    AVERAGING,
    EIGEN_CROP,
    ETH3D_ALIGNMENT_MAX_RES,
    GARG_CROP,
    KB_CROP_HEIGHT,
    KB_CROP_WIDTH,
    NYU_EIGEN_COLS,
    NYU_EIGEN_ROWS,
    NYU_SIZE,
    PROTOCOLS,
    Protocol,
    fraction_crop,
    get_protocol,
    kitti_benchmark_crop,
    nyu_eigen_crop,
)

__all__ = [
    "AVERAGING",
    "EIGEN_CROP",
    "ETH3D_ALIGNMENT_MAX_RES",
    "GARG_CROP",
    "KB_CROP_HEIGHT",
    "KB_CROP_WIDTH",
    "NYU_EIGEN_COLS",
    "NYU_EIGEN_ROWS",
    "NYU_SIZE",
    "PROTOCOLS",
    "Protocol",
    "fraction_crop",
    "get_protocol",
    "kitti_benchmark_crop",
    "nyu_eigen_crop",
]
