"""Where a stored map's pixels sit: resizing a decoded map onto a grid, and the grid's metadata.

A map is decoded at the grid the model answered at, then stored at the
image's grid (`output.resolution: input`, the default) or the answer's
(`model`), its longer side capped at `output.max_side`. `resize_values` maps
values onto that grid by kind (nearest for ids and masks, bilinear for depth
and normals, holes kept as holes); a map stored off the image's grid says so
in its field metadata (`grid_metadata`) and the image's size goes in two
columns (`image_size_columns`), so a reader can map pixels and intrinsics back.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from vb_batch.config import OutputConfig

__all__ = ["grid_metadata", "image_size_columns", "resize_values", "stored_grid"]


def resize_values(values: np.ndarray, kind: str, size: tuple[int, int]) -> np.ndarray:
    """Map a decoded map onto an (H, W) grid: nearest for ids and masks, bilinear for depth and normals.

    Nearest: output pixel (i, j) takes source (i * h // H, j * w // W), exactly. Bilinear: Pillow's
    BILINEAR (pixel centres aligned, source x = (j + 0.5) * w / W - 0.5; antialiased when shrinking).
    Enlarging, the common case (a working-size answer onto a photo's grid), runs as OpenCV's
    INTER_LINEAR on all channels at once, equal to Pillow's within float32 rounding (13-20x
    faster; pinned by tests/test_photos.py); shrinking keeps Pillow. A non-finite source pixel
    makes every output pixel it weighs in non-finite: NaN (invalid) if any NaN does, else +inf
    (far). Normals are renormalised.
    """
    height, width = size
    if values.shape[:2] == (height, width):
        return values
    if kind in ("classes", "mask"):
        rows = np.arange(height) * values.shape[0] // height
        cols = np.arange(width) * values.shape[1] // width
        return np.take(np.take(values, rows, axis=0), cols, axis=1)
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if finite.all():
        resized = _bilinear(values, size)
    else:
        # Pillow alone here: which taps weigh in must be the same for the values and the hole masks.
        resized = _bilinear(np.where(finite, values, np.float32(0)), size, fast=False)
        # Where a far (+inf) or invalid pixel weighs in, the output is far or invalid, never a blend.
        far = _bilinear(np.isposinf(values).astype(np.float32), size, fast=False) > 0
        invalid = _bilinear((~finite & ~np.isposinf(values)).astype(np.float32), size, fast=False) > 0
        resized[far] = np.inf
        resized[invalid] = np.nan
    if kind == "normals":
        norm = np.sqrt(np.einsum("...c,...c->...", resized, resized))[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            resized /= norm
    return resized


def _bilinear(values: np.ndarray, size: tuple[int, int], fast: bool = True) -> np.ndarray:
    """float32 (h, w[, c]) -> (H, W[, c]), Pillow's BILINEAR; OpenCV's equal kernel when enlarging both sides.

    A side kept at its size, and a map with far or invalid pixels (`fast=False`), stay with
    Pillow: the two kernels differ in which zero-weight taps they read at edges and equal sides,
    so a hole would spread differently.
    """
    height, width = size
    if fast and height > values.shape[0] and width > values.shape[1]:
        return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    channels = values[..., None] if values.ndim == 2 else values
    resized = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c]), mode="F").resize((width, height), Image.BILINEAR))
         for c in range(channels.shape[-1])],
        axis=-1,
    )
    return resized[..., 0] if values.ndim == 2 else resized


def grid_metadata(output: OutputConfig) -> dict[bytes, bytes]:
    """Field metadata of a map column stored off the image's grid (none at the default: old outputs keep their fingerprint)."""
    if output.resolution == "input" and output.max_side is None:
        return {}
    height, width = image_size_columns(output)
    meta = {
        "grid": output.resolution,
        # How a stored pixel maps onto the image (pixel centres aligned) and how camera intrinsics follow.
        "grid_to_image": (
            f"x_image = (x + 0.5) * {width} / map_width - 0.5, y_image = (y + 0.5) * {height} / map_height - 0.5; "
            f"intrinsics (pixel centres at +0.5): fx, cx times map_width / {width}, fy, cy times map_height / {height}"
        ),
    }
    if output.max_side is not None:
        meta["max_side"] = str(output.max_side)
    return {f"vb.{k}".encode(): v.encode() for k, v in meta.items()}


def image_size_columns(output: OutputConfig) -> tuple[str, str]:
    """The columns holding each row's image (height, width), written when maps are stored off its grid."""
    return f"{output.prefix}image_height", f"{output.prefix}image_width"


def stored_grid(output: OutputConfig, image_size: tuple[int, int], answer_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) a map is stored at: the image's or the model's answer's grid, its longer side capped at `max_side`."""
    height, width = image_size if output.resolution == "input" else answer_size
    if output.max_side is not None and max(height, width) > output.max_side:
        scale = output.max_side / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return height, width
