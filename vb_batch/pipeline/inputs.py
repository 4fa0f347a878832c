"""Stage 1 (CPU): each row's image bytes or URI -> RGB uint8 pixels, decoded no larger than the model needs.

A Hugging Face image cell with null bytes and a `path` is read from that path as a
URI cell is, under the same fetch rules (`vb_batch.io.sources.image_path_uri`).

    fetch_decode:  rows -> `_vb_rgb` (the decoded pixels), `_vb_image_size` (the whole
                   image's (height, width)) and `vb_error` per row; rows in parallel

A JPEG far larger than the model's working size decodes reduced: `model_resolution`
says about how many pixels the configured model works on (when that is known
before loading it) and `needed_size` the smallest decode that still covers it
for every built-in sizing rule. A row that cannot be read or decoded gets its
`vb_error` and no pixels; the batch goes on.
"""

from __future__ import annotations

import math

import pyarrow as pa

from vb_batch.config import JobConfig
from vb_batch.errors import ERROR_COLUMN, ERROR_TYPE
from vb_batch.io.encodings import arrays_to_column
from vb_batch.io.fetch import read_uri
from vb_batch.io.images import NeededSize, decode_for_model
from vb_batch.io.sources import image_bytes, image_path_uri, image_paths, input_folder
from vb_batch.models.base import working_resolution
from vb_batch.pipeline.columns import (
    IMAGE_COLUMN,
    IMAGE_SIZE_COLUMN,
    IMAGE_SIZE_TYPE,
    column_values,
    row_errors,
    set_column,
)
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.rows import map_rows, row_error
from vb_batch.timing import phase

__all__ = ["fetch_decode", "model_resolution", "needed_size"]


# Margins of `needed_size` over the model's working size: an aspect bucket stretches a side by up to
# 7.5% (half the 3:1 to 4:1 gap), sides rounded to a multiple (16; Qwen's grid 32) gain at most half
# of it, no working side is under 64 px (klein's minimum), and the farthest aspect bucket (Kontext's
# 2.3:1) keeps a short side of 0.66 R.
_WORKING_STRETCH = 1.08
_WORKING_SLACK = 16
_WORKING_MIN_SIDE = 64
_WORKING_MIN_FRACTION = 0.7


def model_resolution(cfg: JobConfig) -> int | None:
    """R such that the model works on at most about R*R pixels of an image, if known before loading.

    The backend's own `working_resolution` hook says it (`ModelBackend.working_resolution`); None:
    the model may work at the input's own size (identity, http, hosted, `processing_resolution: 0`,
    or a default only the checkpoint knows), so images are decoded in full.
    """
    return working_resolution(cfg.model)


def needed_size(resolution: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h, w) a model working at about `resolution`**2 pixels may need of a (height, width) image.

    Conservative for every built-in sizing rule, exact or bucketed (tests sweep it against
    `vb_batch.models.sizing`): an equal-area working size has sides of about side * R / sqrt(area);
    Marigold's longer side R is below that; a bucket stretches a side by a few percent, and an
    image more elongated than its farthest bucket keeps a short side of at least 0.66 R.
    """
    scale = max(resolution / math.sqrt(height * width), _WORKING_MIN_SIDE / min(height, width)) * _WORKING_STRETCH
    floor = math.ceil(resolution * _WORKING_MIN_FRACTION)
    return tuple(min(side, max(math.ceil(side * scale), floor) + _WORKING_SLACK) for side in (height, width))


def _needed(plan: ResolvedJob) -> NeededSize | None:
    resolution = model_resolution(plan.cfg)
    return None if resolution is None else (lambda height, width: needed_size(resolution, height, width))


def fetch_decode(batch: pa.RecordBatch, plan: ResolvedJob) -> pa.RecordBatch:
    """Stage 1 (CPU): read each row's image (bytes or URI) and decode it to RGB uint8, rows in parallel.

    A JPEG far larger than the model's working size decodes reduced (`model_resolution`,
    `needed_size`); the whole image's size goes to `IMAGE_SIZE_COLUMN` for the output grid.
    """
    cfg = plan.cfg.input
    with phase("fetch_decode"):
        if plan.image_column:
            column = batch.column(batch.schema.get_field_index(plan.image_column))
            cells, paths = image_bytes(column).to_pylist(), image_paths(column)
            folder = input_folder(cfg) if any(p is not None for p in paths) else None
        else:
            cells = column_values(batch, plan.uri_column)
        errors = row_errors(batch)
        needed = _needed(plan)

    def read_one(i: int) -> bytes | None:
        if not plan.image_column:
            return read_uri(cells[i], cfg)
        return cells[i] if paths[i] is None else read_uri(image_path_uri(paths[i], folder), cfg)

    def fetch_one(i: int):
        if errors[i] is not None:
            return None, None, errors[i]
        with phase("fetch_decode"):
            try:
                decoded = decode_for_model(read_one(i), cfg.max_pixels, cfg.min_side, cfg.image_formats, cfg.max_bytes,
                                           needed, timeout_s=cfg.decode_timeout_s, max_jpeg_scans=cfg.max_jpeg_scans)
                return decoded.pixels, list(decoded.size), None
            except Exception as exc:  # noqa: BLE001 - the row guard: whatever one row raises is its own error
                return None, None, row_error(exc, "internal_error", "fetch and decode: ")

    rows = map_rows(fetch_one, list(range(len(cells))))
    with phase("fetch_decode"):
        batch = set_column(batch, IMAGE_COLUMN, arrays_to_column([image for image, _, _ in rows]))
        batch = set_column(batch, IMAGE_SIZE_COLUMN, pa.array([size for _, size, _ in rows], IMAGE_SIZE_TYPE))
        return set_column(batch, ERROR_COLUMN, pa.array([error for _, _, error in rows], ERROR_TYPE))
