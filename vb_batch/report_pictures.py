"""Pictures in the run report and `vb-batch show`: thumbnails of inputs and maps, histograms, bars.

Everything here is drawn from values read from an output, which may be someone
else's: legend colours are used only when they are three integers in 0..255,
text in plots is bounded and literal, and every picture becomes a PNG data URI
generated here (see `vb_batch.report` for the whole contract). Input images
come only from the output itself, or from URIs under rules the viewer gives.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vb_batch.config import InputConfig
from vb_batch.io.encodings import ColumnMeta, decode_map
from vb_batch.io.outputs import OutputView
from vb_batch.previews import (
    colorize_depth,
    colorize_normals,
    depth_range,
    overlay_classes,
    shrink,
)

log = logging.getLogger("vb_batch.report")  # the report's logger: its warnings read as the report's

THUMB_SIDE = 256
NEUTRAL_RGB = (128, 128, 128)  # a legend colour that is not three integers in 0..255


def _rgb(colour: Any) -> tuple[int, int, int]:
    """A legend colour as three ints in 0..255; anything else is neutral grey."""
    valid = (
        isinstance(colour, (list, tuple)) and len(colour) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)
    )
    return tuple(colour) if valid else NEUTRAL_RGB


def _legend(meta: ColumnMeta) -> list[tuple[str, tuple[int, int, int]]]:
    return [(str(name), _rgb(colour)) for name, colour in (meta.legend or [])]


def _plot_text(text: Any, limit: int = 60) -> str:
    """Text for a matplotlib label: bounded, and `$` literal (matplotlib would parse mathtext)."""
    return str(text)[:limit].replace("$", r"\$")


def png_data_uri(rgb: np.ndarray, max_side: int = THUMB_SIDE) -> str:
    image = Image.fromarray(rgb)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Picture:
    """One preview: its pixels and, for depth, the (near, far) range of its colours and what they were made from."""

    rgb: np.ndarray
    value_range: tuple[float, float] | None = None
    unit: str = ""
    values: np.ndarray | None = None  # depth: the thinned map the colours show


def row_pictures(
    view: OutputView, row: dict[str, Any], rules: InputConfig | None = None, max_side: int = THUMB_SIDE
) -> dict[str, Picture]:
    """Input and preview pictures of one output row, by name, at most `max_side` pixels long (0: full size).

    Maps are thinned before they are coloured; the row's depth maps of one unit (its
    prediction and any ground truth) share one colour range. A map that cannot be
    decoded is left out. `rules`: where URI inputs may be fetched (see the module
    docstring; None: nowhere, the output's own pictures only).
    """
    pictures: dict[str, Picture] = {}
    image = view.input_image(row, rules)
    if image is not None:
        pictures["input"] = Picture(shrink(image, max_side))
    maps: dict[str, tuple[np.ndarray, ColumnMeta]] = {}
    for name, meta in view.maps.items():
        if row.get(name) is None:
            continue
        try:
            maps[name] = (shrink(np.asarray(decode_map(row[name], meta)), max_side), meta)
        except Exception as exc:  # noqa: BLE001 - one undecodable cell must not stop the report
            log.warning("report: no picture of %s for row %s: %s", name, row.get(view.id_column), exc)
    # One colour range per depth unit in the row: truth and prediction compare by colour.
    ranges: dict[str, tuple[float, float] | None] = {}
    for values, meta in maps.values():
        if meta.kind == "depth" and meta.unit not in ranges:
            same_unit = [v for v, m in maps.values() if m.kind == "depth" and m.unit == meta.unit]
            ranges[meta.unit] = depth_range(same_unit, _relative(meta))
    for name, (values, meta) in maps.items():
        try:
            if meta.kind == "depth":
                rgb = colorize_depth(values, _relative(meta), ranges[meta.unit])
                pictures[name] = Picture(rgb, ranges[meta.unit], str(meta.unit), values)
            else:  # masks go over the input thinned alike (same full size: same thinned size)
                pictures[name] = Picture(map_picture(values, meta, pictures["input"].rgb if image is not None else None))
        except Exception as exc:  # noqa: BLE001 - one bad map must not stop the report
            log.warning("report: no picture of %s for row %s: %s", name, row.get(view.id_column), exc)
    return pictures


def _relative(meta: ColumnMeta) -> bool:
    return str(meta.unit).startswith("relative")


def map_picture(values: np.ndarray, meta: ColumnMeta, image: np.ndarray | None) -> np.ndarray:
    """A decoded map as a picture: colourised depth, normals as colour, classes over the input."""
    if meta.kind == "depth":
        return colorize_depth(values, relative=_relative(meta))
    if meta.kind == "normals":
        return colorize_normals(values, meta.frame or "opengl")
    legend = _legend(meta)
    colours = np.array([c for _, c in legend] if legend else [[255, 64, 64]], np.uint8)
    ids = values.astype(np.int64) if legend else np.where(values > 0, 0, 1)
    base = image if image is not None and image.shape[:2] == ids.shape else np.zeros(ids.shape + (3,), np.uint8)
    return overlay_classes(base, ids, colours)


def _figure_uri(fig) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def histogram_figure(values: list[np.ndarray] | np.ndarray, title: str, xlabel: str, log_x: bool = False):
    """A matplotlib figure of `values`' histogram with at most 6 plain tick labels (none overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(5.5, 2.6), dpi=100)
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    # A log axis only over a decade or more: within one, its labelled minor ticks collide.
    if log_x and data.size and data.min() > 0 and data.max() >= 10 * data.min():
        bins = np.geomspace(data.min(), data.max() * 1.0001, 40)
        ax.set_xscale("log")
        # 1-2-5 steps over two decades or less, else decades only, written plainly (0.5, 1, 10); minor ticks unlabelled.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if data.max() / data.min() < 100 else (1.0,),
                                              numticks=7))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        bins = 40
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.hist(data, bins=bins, color="#3b6fb6")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(_plot_text(xlabel), fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def _histogram_uri(values: list[np.ndarray] | np.ndarray, title: str, xlabel: str, log_x: bool = False) -> str:
    return _figure_uri(histogram_figure(values, title, xlabel, log_x))


def _bars_uri(names: list[str], values: list[float], colours: list[tuple[int, int, int]], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 0.3 * len(names) + 1), dpi=100)
    labels = [_plot_text(n) for n in names]
    ax.barh(labels[::-1], values[::-1], color=[tuple(c / 255 for c in rgb) for rgb in colours[::-1]], edgecolor="#444")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("mean fraction of pixels", fontsize=9)
    ax.tick_params(labelsize=8)
    return _figure_uri(fig)

