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


def shrink(values: np.ndarray, max_side: int) -> np.ndarray:
    """Every k-th pixel so that the longer side is at most `max_side` (0: as is): a view, no copy.

    Previews are made from this, never from the full map: colourising costs per
    pixel, so a 12-megapixel photo costs what a thumbnail costs. Nearest-pixel
    sampling keeps class ids and invalid markers exact (no blending across them).
    """
    longest = max(values.shape[:2])
    if max_side <= 0 or longest <= max_side:
        return values
    step = -(-longest // max_side)
    return values[::step, ::step]


def depth_range(maps: list[np.ndarray], relative: bool = False) -> tuple[float, float] | None:
    """(near, far) shown by `colorize_depth`, in the maps' unit, over all `maps` together (None: no finite pixel).

    One range for several maps (a row's prediction and its ground truth) puts them on one
    colour scale, so equal colours mean equal depths. The 2nd and 98th percentiles of what is
    shown (inverse depth for metric maps, depth itself for relative ones) ignore stray pixels.
    """
    values = [np.asarray(m, np.float32)[np.isfinite(m)] for m in maps]
    values = np.concatenate([v for v in values if v.size] or [np.empty(0, np.float32)])
    if relative:
        if not values.size:
            return None
        near, far = np.percentile(values, [2, 98])
        return float(near), float(far)
    values = values[values > 0]
    if not values.size:
        return None
    low, high = np.percentile(1.0 / values, [2, 98])  # inverse depth: high is near
    return float(1.0 / high), float(1.0 / max(low, 1e-6))


def colorize_depth(depth: np.ndarray, relative: bool = False, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Depth -> RGB uint8 with the turbo colour map; near is red, far is blue.

    Metric depth is shown as inverse depth (what the eye reads as structure),
    stretched over `value_range` = (near, far) in the map's unit (default:
    `depth_range` of this map alone). Sky / far (+inf) is black, invalid grey.
    """
    depth = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(depth)
    rgb = np.empty(depth.shape + (3,), dtype=np.uint8)
    rgb[:] = INVALID_COLOUR
    rgb[np.isposinf(depth)] = FAR_COLOUR
    value_range = value_range or depth_range([depth], relative)
    if finite.any() and value_range is not None:
        rgb[finite] = _turbo(_nearness(depth[finite], value_range, relative))
    return rgb


def _nearness(depth: np.ndarray, value_range: tuple[float, float], relative: bool) -> np.ndarray:
    """0 at the far end of the range, 1 at the near end (clipped), on the scale the colours are read on."""
    near, far = value_range
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            t = (far - depth) / max(far - near, 1e-6)
        else:
            inverse = 1.0 / np.maximum(depth, 1e-6)
            t = (inverse - 1.0 / max(far, 1e-6)) / max(1.0 / max(near, 1e-6) - 1.0 / max(far, 1e-6), 1e-12)
    return np.clip(np.nan_to_num(t, nan=0.0), 0, 1)


def _turbo(t: np.ndarray) -> np.ndarray:
    return (colormaps["turbo"](t)[..., :3] * 255).astype(np.uint8)


def depth_colour_bar(width: int = 256, height: int = 10) -> np.ndarray:
    """The colours of `colorize_depth` from near (left, red) to far (right, blue), as an RGB picture.

    The scale between is that of the preview: inverse depth for metric maps, so the
    middle of the bar is the harmonic, not the arithmetic, mean of near and far.
    """
    t = np.linspace(1.0, 0.0, width, dtype=np.float32)
    return np.repeat(_turbo(t)[None], height, axis=0)


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


def with_colour_bar(rgb: np.ndarray, value_range: tuple[float, float], unit: str) -> np.ndarray:
    """A depth preview with its colour bar and range written under it (for PNG files read on their own)."""
    from PIL import Image, ImageDraw

    width = max(rgb.shape[1], 160)
    bar = depth_colour_bar(width, 10)
    canvas = Image.new("RGB", (width, rgb.shape[0] + 10 + 16), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, 0))
    canvas.paste(Image.fromarray(bar), (0, rgb.shape[0]))
    near, far = value_range
    short = "m" if unit == "m" else "rel"
    draw = ImageDraw.Draw(canvas)
    draw.text((1, rgb.shape[0] + 11), f"{near:.3g} {short}", fill=(0, 0, 0))
    label = f"{far:.3g} {short}"
    draw.text((width - 1 - int(draw.textlength(label)), rgb.shape[0] + 11), label, fill=(0, 0, 0))
    return np.asarray(canvas)
