"""The static HTML run report (`<output>/_report.html`) and per-row previews (`vb-batch show`).

The report is one self-contained file (pictures inlined as data URIs) that
opens from disk with no server: a sample grid of input / depth / normals /
mask overlay with the legend, histograms of depth and class fractions, the
error table, run summaries, config and provenance. It reads only summary
columns for all rows, and full maps for the sampled rows alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vb_batch.config import StorageOptions
from vb_batch.io.encodings import decode_map
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.outputs import OutputView
from vb_batch.previews import colorize_depth, colorize_normals, overlay_classes

log = logging.getLogger(__name__)

REPORT_NAME = "_report.html"
THUMB_SIDE = 256


# ---------------------------------------------------------------------------- reading the output


# ---------------------------------------------------------------------------- pictures


def png_data_uri(rgb: np.ndarray, max_side: int = THUMB_SIDE) -> str:
    image = Image.fromarray(rgb)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def row_pictures(view: OutputView, row: dict[str, Any]) -> dict[str, np.ndarray]:
    """Input and preview pictures of one output row, by name."""
    pictures: dict[str, np.ndarray] = {}
    image = view.input_image(row)
    if image is not None:
        pictures["input"] = image
    for name, meta in view.maps.items():
        if row.get(name) is None:
            continue
        values = decode_map(row[name], meta)
        if meta.kind == "depth":
            pictures[name] = colorize_depth(values, relative=meta.unit.startswith("relative"))
        elif meta.kind == "normals":
            pictures[name] = colorize_normals(values, meta.frame or "opengl")
        else:
            colours = (
                np.array([c for _, c in meta.legend], np.uint8) if meta.legend else np.array([[255, 64, 64]], np.uint8)
            )
            ids = values.astype(np.int64) if meta.legend else np.where(values > 0, 0, 1)
            base = image if image is not None and image.shape[:2] == ids.shape else np.zeros(ids.shape + (3,), np.uint8)
            pictures[name] = overlay_classes(base, ids, colours)
    return pictures


def _figure_uri(fig) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _histogram_uri(values: list[np.ndarray] | np.ndarray, title: str, xlabel: str, log_x: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if log_x and data.size and data.min() > 0:
        bins = np.geomspace(data.min(), data.max() * 1.0001, 40)
        ax.set_xscale("log")
    else:
        bins = 40
    ax.hist(data, bins=bins, color="#3b6fb6")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    return _figure_uri(fig)


def _bars_uri(names: list[str], values: list[float], colours: list[tuple[int, int, int]], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 0.3 * len(names) + 1), dpi=100)
    ax.barh(names[::-1], values[::-1], color=[tuple(c / 255 for c in rgb) for rgb in colours[::-1]], edgecolor="#444")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("mean fraction of pixels", fontsize=9)
    ax.tick_params(labelsize=8)
    return _figure_uri(fig)


# ---------------------------------------------------------------------------- the report

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.grid td{vertical-align:top}.grid img{max-width:256px;image-rendering:pixelated;display:block}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #444;margin:0 4px 0 10px;vertical-align:middle}
.ok{color:#17733a}.bad{color:#b3261e}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}
#broken{color:#b3261e;font-weight:bold}
"""

# Tells a reader (and the headless-browser test) when a picture failed to load.
CHECK_IMAGES = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', broken.length);
  if (broken.length) document.getElementById('broken').textContent = broken.length + ' picture(s) failed to load';
});
"""


def _run_records(view: OutputView) -> list[dict[str, Any]]:
    fs, root = fsspec_filesystem(view.path, view.storage)
    records = []
    for path in sorted(fs.glob(posixpath.join(root, "_vb", "runs", "*.json"))):
        with fs.open(path, "rb") as f:
            records.append(json.loads(f.read()))
    return records


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(path: str, storage: StorageOptions | None = None, samples: int = 12) -> str:
    """The report's HTML for the output dataset at `path`."""
    view = OutputView(path, storage)
    e = html.escape
    id_col = view.id_column
    summary_cols = [c for c in view.schema.names if c.endswith(("_median_m", "_median_rel", "_fractions"))]
    overview = view.read([id_col, "vb_error", "vb_model", "vb_run_id", *summary_cols])
    n_rows = overview.num_rows
    errors = overview.column("vb_error").to_pylist() if "vb_error" in overview.column_names else [None] * n_rows
    failed = [(i, err) for i, err in zip(overview.column(id_col).to_pylist(), errors) if err]
    parts = [f"<h1>vb-batch run report</h1><p id='broken'></p><p>Output <code>{e(path)}</code>: {n_rows} rows, "
             f"<span class='ok'>{n_rows - len(failed)} ok</span>, <span class='bad'>{len(failed)} failed</span>.</p>"]

    runs = _run_records(view)
    if runs:
        rows = [[e(r.get("run_id", "")), "finished" if r.get("success") else "<span class='bad'>failed</span>",
                 r.get("engine", ""), r.get("rows_ok", 0), r.get("rows_failed", 0), r.get("rows_skipped", 0),
                 f"{r.get('seconds', 0):.1f}", f"{r.get('rows_per_second', 0):.2f}"] for r in runs]
        parts.append("<h2>Runs</h2>" + _table(["run", "status", "engine", "ok", "failed", "skipped", "seconds", "rows/s"], rows))

    # Sample grid: the first rows that succeeded, full maps for those only.
    map_names = list(view.maps)
    ok_filter = pc.field("vb_error").is_null() if "vb_error" in view.schema.names else None
    sample = view.read(view.schema.names, filter=ok_filter, limit=samples).to_pylist()
    parts.append(f"<h2>Samples ({len(sample)} of {n_rows - len(failed)} successful rows)</h2>")
    legend_html = ""
    for name, meta in view.maps.items():
        if meta.legend:
            swatches = "".join(
                f"<span class='swatch' style='background:rgb{tuple(c)}'></span>{e(n)}" for n, c in meta.legend
            )
            legend_html += f"<p><b>{e(name)}</b> legend: {swatches}</p>"
    parts.append(legend_html)
    grid_rows = []
    for row in sample:
        pictures = row_pictures(view, row)
        cells = [f"<b>{e(str(row.get(id_col)))}</b>"]
        for name in ["input", *map_names]:
            cells.append(f"<img alt='{e(name)}' src='{png_data_uri(pictures[name])}'>" if name in pictures else "&ndash;")
        grid_rows.append(cells)
    parts.append("<div class='grid'>" + _table(["id", "input", *map_names], grid_rows) + "</div>")

    # Distributions from summary columns (all rows) and pixels (sampled rows).
    plots = []
    for col in summary_cols:
        if col.endswith(("_median_m", "_median_rel")):
            values = np.array([v for v in overview.column(col).to_pylist() if v is not None])
            if values.size:
                unit = "m" if col.endswith("_m") else "relative"
                plots.append(_histogram_uri(values, f"per-row median depth ({len(values)} rows)", unit, log_x=unit == "m"))
    depth_col = view.column_of("depth")
    if depth_col and sample:
        pixels = [decode_map(r[depth_col], view.maps[depth_col]).ravel() for r in sample if r.get(depth_col) is not None]
        if pixels:
            unit = view.maps[depth_col].unit
            plots.append(_histogram_uri(np.concatenate(pixels), f"depth of all pixels in {len(pixels)} samples", unit,
                                        log_x=unit == "m"))
    for col in summary_cols:
        if col.endswith("_fractions"):
            cells = [c for c in overview.column(col).to_pylist() if c]
            meta = view.maps.get(col[: -len("_fractions")])
            if cells and meta and meta.legend:
                names = [n for n, _ in meta.legend]
                means = np.mean([[f["fraction"] for f in c] for c in cells], axis=0)
                plots.append(_bars_uri(names, list(means), [c for _, c in meta.legend], f"class fractions ({len(cells)} rows)"))
    if plots:
        parts.append("<h2>Distributions</h2>" + "".join(f"<img alt='plot' src='{p}'> " for p in plots))

    parts.append("<h2>Errors</h2>")
    if failed:
        by_code: dict[str, list] = {}
        for row_id, err in failed:
            by_code.setdefault(err["code"], []).append((row_id, err["message"]))
        rows = [[e(code), len(items), "<br>".join(f"{e(str(i))}: {e(m)}" for i, m in items[:3])]
                for code, items in sorted(by_code.items(), key=lambda kv: -len(kv[1]))]
        parts.append(_table(["code", "rows", "examples"], rows))
    else:
        parts.append("<p class='ok'>No row failed.</p>")

    models = sorted(set(overview.column("vb_model").to_pylist())) if "vb_model" in overview.column_names else []
    meta = view.schema.metadata or {}
    parts.append("<h2>Provenance</h2>" + _table(["key", "value"], [
        ["vb_batch version", e(meta.get(b"vb.version", b"?").decode())],
        ["model(s)", e(", ".join(str(m) for m in models))],
        ["runs", e(", ".join(sorted(set(overview.column("vb_run_id").to_pylist()))) if "vb_run_id" in overview.column_names else "")],
    ]))
    field_rows = [[e(n), e(m.kind), e(m.encoding), e(m.unit), e(str(m.scale or "")), e(m.frame or "")] for n, m in view.maps.items()]
    parts.append(_table(["column", "kind", "encoding", "unit", "scale", "frame"], field_rows))
    parts.append("<h2>Config</h2><pre>" + e(json.dumps(view.job, indent=2)) + "</pre>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vb-batch report</title>"
            f"<style>{STYLE}</style><script>{CHECK_IMAGES}</script></head><body>{''.join(parts)}</body></html>")


def write_report(path: str, storage: StorageOptions | None = None, samples: int = 12) -> str:
    """(Re)write `<path>/_report.html`; returns where it went."""
    text = build_report(path, storage, samples)
    fs, root = fsspec_filesystem(path, storage)
    target = posixpath.join(root, REPORT_NAME)
    fs.pipe_file(target, text.encode())
    return target if "://" not in path else path.rstrip("/") + "/" + REPORT_NAME


def show_row(path: str, row_id: str, out_dir: str | Path, storage: StorageOptions | None = None) -> list[Path]:
    """Write the input and preview PNGs of one row to `out_dir`; returns the files."""
    view = OutputView(path, storage)
    ids = view.read([view.id_column]).column(view.id_column)
    typed_id: Any = row_id
    if pa.types.is_integer(ids.type):
        typed_id = int(row_id)
    table = view.read(view.schema.names, filter=pc.field(view.id_column) == typed_id, limit=1)
    if table.num_rows == 0:
        raise KeyError(f"no row with {view.id_column} = {row_id!r} in {path}")
    row = table.to_pylist()[0]
    if row.get("vb_error"):
        log.warning("row %s failed: %s", row_id, row["vb_error"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(row_id))
    written = []
    for name, rgb in row_pictures(view, row).items():
        target = out_dir / f"{safe}_{name}.png"
        Image.fromarray(rgb).save(target)
        written.append(target)
    return written
