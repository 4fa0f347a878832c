"""Pictures of decoded maps for people: colourised depth, normals as colour, masks over the image.

These are for looking, not for storage: previews are lossy by design
(percentile-stretched depth, 8-bit colours) and never feed back into labels.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from vb_batch.codecs import normals as normals_codec

FAR_COLOUR = (0, 0, 0)  # sky / beyond range
INVALID_COLOUR = (128, 128, 128)


def colorize_depth(depth: np.ndarray, relative: bool = False) -> np.ndarray:
    """Depth -> RGB uint8 with the turbo colour map; near is red, far is blue.

    Metric depth is shown as inverse depth (what the eye reads as structure),
    stretched between the 2nd and 98th percentile of the finite pixels.
    """
    depth = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(depth)
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = depth if relative else 1.0 / np.maximum(depth, 1e-6)
    rgb = np.empty(depth.shape + (3,), dtype=np.uint8)
    rgb[:] = INVALID_COLOUR
    rgb[np.isposinf(depth)] = FAR_COLOUR
    if finite.any():
        lo, hi = np.percentile(shown[finite], [2, 98])
        t = np.clip((shown - lo) / max(hi - lo, 1e-6), 0, 1)
        if relative:
            t = 1 - t  # relative depth: 0 is near; show near as warm like metric
        colours = (colormaps["turbo"](t[finite])[:, :3] * 255).astype(np.uint8)
        rgb[finite] = colours
    return rgb


def colorize_normals(n: np.ndarray, frame: str = "opengl") -> np.ndarray:
    """Unit normals -> the familiar normal-map colours (OpenGL frame), invalid pixels black."""
    n = np.asarray(n, dtype=np.float32)
    valid = np.isfinite(n).all(axis=-1)
    rgb = np.zeros(n.shape, dtype=np.uint8)
    if valid.any():
        gl = normals_codec.convert(np.where(valid[..., None], n, 0), frame, "opengl")
        rgb[valid] = normals_codec.encode(gl, frame="opengl")[valid]
    return rgb


def overlay_classes(image: np.ndarray, ids: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend class colours over the image; unlabelled pixels (ids outside the legend) stay as they are."""
    image = np.asarray(image, dtype=np.float32)
    labelled = ids < len(colours)
    out = image.copy()
    if ids.shape != image.shape[:2]:
        raise ValueError(f"mask {ids.shape} and image {image.shape[:2]} differ in size")
    out[labelled] = (1 - alpha) * image[labelled] + alpha * np.asarray(colours, np.float32)[ids[labelled]]
    return np.clip(out, 0, 255).astype(np.uint8)
