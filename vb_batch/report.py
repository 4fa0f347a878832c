"""The static HTML run report (`<output>/_report.html`) and per-row previews (`vb-batch show`).

The report is one self-contained file (pictures inlined as data URIs) that
opens from disk with no server: a sample grid of input / depth / normals /
mask overlay with the legend, histograms of depth and class fractions, the
error table, run summaries, config and provenance. It reads only summary
columns for all rows, and full maps for the sampled rows alone; the samples
are spread evenly over the output, and the error examples over each code's rows.

Previews are made from maps thinned to the thumbnail size *before* colourising
(`previews.shrink`), so a row costs about the same whatever its resolution. Every
depth preview carries a colour bar with its range (near, far), and the depth maps
of one row (prediction and ground truth) share one range: equal colours, equal depths.

Python: `vb_batch.report(OUTPUT)` (this module is callable) writes the report, and
`vb_batch.show(OUTPUT, ID, DIR)` the previews of one row (here of two scenes with
ground truth, the input images decoded as depth paintings by the identity backend):

>>> import tempfile, pyarrow.parquet as pq, vb_batch
>>> from vb_batch.scenes import scene_table
>>> tmp = tempfile.mkdtemp()
>>> pq.write_table(scene_table([1_000_000, 1_000_001], size=(48, 64)), f"{tmp}/scenes.parquet")
>>> summary = vb_batch.annotate({"input": {"path": f"{tmp}/scenes.parquet", "image_column": "image"},
...                              "output": {"path": f"{tmp}/out", "report": False},
...                              "model": {"backend": "identity"}, "run": {"progress": False}})
>>> vb_batch.report(f"{tmp}/out")                                  # doctest: +ELLIPSIS
'/.../out/_report.html'
>>> [p.name for p in vb_batch.show(f"{tmp}/out", "scene-1000001", f"{tmp}/previews", max_side=512)]
['scene-1000001_input.png', 'scene-1000001_gt_depth.png', 'scene-1000001_gt_normals.png', 'scene-1000001_gt_segmentation.png', 'scene-1000001_gt_instances.png', 'scene-1000001_depth.png']

An output's files are data, never instructions: the report may be built from
an output someone else wrote. What it guarantees:

- Nothing in it runs. Every value read from the output (run records, schema and
  field metadata, ids, error messages, summary values, the stored config) is
  HTML-escaped for text and attributes (`html.escape(..., quote=True)`); numbers
  are formatted from real numbers only ("?" otherwise); CSS colours are written
  only from three integers in 0..255 (else a neutral grey); every `src` is a
  `data:image/png;base64,` URI generated here. The page has no script, and a
  Content-Security-Policy that forbids scripts, every fetch but `data:` images,
  forms and `<base>`: a slip in escaping would still run and load nothing.
- Its secrets stay masked: the stored config is shown through
  `vb_batch.masking.redact` again (outputs written by older versions included).
- Its pictures come from the output itself: stored input bytes and maps. A URI
  cell may name any file of the viewer's, so inputs given by URI are fetched
  only under rules the viewer gives: when vb_batch reports its own run, the
  live job's (`write_report(..., input_config=cfg.input)`); otherwise
  (`vb-batch report`, `vb-batch show`) none unless `allow_uri_prefixes` /
  `--allow-uri-prefix PREFIX` (repeatable) names where, and then only there,
  with the default limits and no loopback, private or link-local http hosts
  unless `allow_private_addresses` / `--allow-private-addresses`
  (`OutputView.uri_rules`). The stored config never chooses or widens them.
- Error messages and log lines never quote a file's bytes.
"""

from __future__ import annotations

import html
import json
import logging
import math
import posixpath
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from vb_batch.config import InputConfig, StorageOptions
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.outputs import OutputView
from vb_batch.masking import redact
from vb_batch.previews import (
    depth_colour_bar,
    with_colour_bar,
)
from vb_batch.report_pictures import (  # noqa: F401 - re-exported: the report's pictures lived here
    NEUTRAL_RGB,
    THUMB_SIDE,
    Picture,
    _bars_uri,
    _histogram_uri,
    _legend,
    _plot_text,
    _rgb,
    histogram_figure,
    map_picture,
    png_data_uri,
    row_pictures,
)

log = logging.getLogger(__name__)

REPORT_NAME = "_report.html"
SHOW_SIDE = 1024  # `vb-batch show`: the longest side of its PNGs unless --max-side says otherwise
# No script, no fetch: only data: images and the page's own inline styles.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# ---------------------------------------------------------------------------- values from the output


class Markup(str):
    """HTML built here from escaped parts: `_table` writes it as is, and escapes every other cell."""


def _text(value: Any) -> str:
    """Any value as HTML text or attribute content."""
    return html.escape(str(value), quote=True)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def _number(value: Any, spec: str) -> str:
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return format(value, spec) if real else "?"


def _error_parts(err: Any) -> tuple[str, str]:
    if isinstance(err, dict):
        return str(err.get("code")), str(err.get("message"))
    return "?", str(err)


# ---------------------------------------------------------------------------- the report

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.grid td{vertical-align:top}.grid img{max-width:256px;image-rendering:pixelated;display:block}
.grid img.colour-bar{width:100%;max-width:256px;height:10px;margin-top:2px}
.range{display:block;font-size:11px;color:#444;white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #444;margin:0 4px 0 10px;vertical-align:middle}
.ok{color:#17733a}.bad{color:#b3261e}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}
.note{color:#555}
"""


def _run_records(view: OutputView) -> list[dict[str, Any]]:
    fs, root = fsspec_filesystem(view.path, view.storage)
    records = []
    for path in sorted(fs.glob(posixpath.join(root, "_vb", "runs", "*.json"))):
        try:
            with fs.open(path, "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError) as exc:
            log.warning("report: skipped run record %s: %s", path, exc)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell is escaped text unless it is `Markup` built here."""

    def cell(value: Any) -> str:
        return value if isinstance(value, Markup) else _text(value)

    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _run_row(record: dict[str, Any]) -> list[Any]:
    status = Markup("finished") if record.get("success") is True else Markup("<span class='bad'>failed</span>")
    by_code = record.get("errors_by_code")
    errors = ", ".join(f"{code}: {_count(n)}" for code, n in by_code.items()) if isinstance(by_code, dict) else ""
    return [
        record.get("run_id", ""), status, record.get("engine", ""), _count(record.get("rows_ok")),
        _count(record.get("rows_failed")), _count(record.get("rows_skipped")), _number(record.get("seconds"), ".1f"),
        _number(record.get("rows_per_second"), ".2f"), errors, record.get("message", ""),
    ]


def _numbers(values: list[Any]) -> np.ndarray:
    return np.array([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)], np.float64)


def _distributions(view: OutputView, overview: pa.Table, summary_cols: list[str], sample: list[dict[str, Picture]]
                   ) -> list[str]:
    """Histogram and bar-chart data URIs from summary columns (all rows) and thinned depth maps (sampled rows)."""
    plots = []
    for col in summary_cols:
        if col.endswith(("_median_m", "_median_rel")):
            values = _numbers(overview.column(col).to_pylist())
            if values.size:
                unit = "m" if col.endswith("_m") else "relative"
                plots.append(_histogram_uri(values, f"per-row median depth ({len(values)} rows)", unit, log_x=unit == "m"))
    depth_col = view.column_of("depth")
    if depth_col and sample:
        meta = view.maps[depth_col]
        pixels = [np.asarray(p[depth_col].values, np.float64).ravel() for p in sample
                  if depth_col in p and p[depth_col].values is not None]
        if pixels:
            plots.append(_histogram_uri(np.concatenate(pixels), f"depth of the pixels of {len(pixels)} samples "
                                        "(thumbnails)", meta.unit, log_x=meta.unit == "m"))
    for col in summary_cols:
        meta = view.maps.get(col[: -len("_fractions")]) if col.endswith("_fractions") else None
        if meta is None or not meta.legend:
            continue
        legend = _legend(meta)
        rows = []
        for cell in overview.column(col).to_pylist():
            if isinstance(cell, list) and len(cell) == len(legend) and all(isinstance(f, dict) for f in cell):
                fractions = _numbers([f.get("fraction") for f in cell])
                if fractions.size == len(legend):
                    rows.append(fractions)
        if rows:
            plots.append(_bars_uri([n for n, _ in legend], list(np.mean(rows, axis=0)), [c for _, c in legend],
                                   f"class fractions ({len(rows)} rows)"))
    return plots


def spread(items: list[Any], count: int) -> list[Any]:
    """`count` items evenly spaced over `items` (first and last included), in order; all when there are fewer."""
    if count <= 0:
        return []
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


def _sample_filter(view: OutputView, id_col: str | None, ids: list[Any], errors: list[Any], samples: int):
    """The sampled rows: successful rows spread over the output (by id), or the first successful ones without ids."""
    ok_filter = pc.field("vb_error").is_null() if "vb_error" in view.schema.names else None
    if id_col is None:
        return ok_filter
    chosen = spread([i for i, err in zip(ids, errors) if not err and i is not None], samples)
    return pc.field(id_col).isin(pa.array(chosen, view.schema.field(id_col).type))


def _picture_cell(name: str, picture: Picture, bar_uri: str) -> Markup:
    """A grid cell: the picture; for depth also its colour bar and range, also as data-near / data-far attributes."""
    img = f"<img alt='{_text(name)}' src='{png_data_uri(picture.rgb)}'"
    if picture.value_range is None:
        return Markup(img + ">")
    near, far = (_number(v, ".4g") for v in picture.value_range)
    unit = "m" if picture.unit == "m" else "relative"
    return Markup(
        f"<div class='depth'>{img} class='depth-map' data-near='{near}' data-far='{far}' data-unit='{_text(unit)}'>"
        f"<img alt='colour bar' class='colour-bar' src='{bar_uri}'>"
        f"<span class='range'>near {near} &larr; &rarr; far {far} {_text('m' if unit == 'm' else '(relative)')}"
        "</span></div>"
    )


def build_report(
    path: str, storage: StorageOptions | None = None, samples: int = 12, input_config: InputConfig | None = None,
    *, allow_uri_prefixes: list[str] | None = None, allow_private_addresses: bool = False,
) -> str:
    """The report's HTML for the output dataset at `path`.

    `input_config`: the URI fetch rules of the job that wrote the output, when vb_batch reports its
    own run (trusted as given). Otherwise URI inputs are read only under `allow_uri_prefixes`
    (and `allow_private_addresses`), the viewer's word (see the module docstring).
    """
    view = OutputView(path, storage)
    rules = input_config or view.uri_rules(allow_uri_prefixes, allow_private_addresses)
    e = _text
    id_col = view.id_column if isinstance(view.id_column, str) and view.id_column in view.schema.names else None
    summary_cols = [
        c for c in view.schema.names
        if (c.endswith(("_median_m", "_median_rel")) and pa.types.is_floating(view.schema.field(c).type))
        or c.endswith("_fractions")
    ]
    overview = view.read([c for c in (id_col, "vb_error", "vb_model", "vb_run_id", *summary_cols) if c])
    n_rows = overview.num_rows
    ids = overview.column(id_col).to_pylist() if id_col else list(range(n_rows))
    errors = overview.column("vb_error").to_pylist() if "vb_error" in overview.column_names else [None] * n_rows
    failed = [(i, err) for i, err in zip(ids, errors) if err]
    parts = [(f"<h1>vb-batch run report</h1><p>Output <code>{e(path)}</code>: {n_rows} rows, "
              f"<span class='ok'>{n_rows - len(failed)} ok</span>, <span class='bad'>{len(failed)} failed</span>.</p>")]

    runs = _run_records(view)
    if runs:
        headers = ["run", "status", "engine", "ok", "failed", "skipped", "seconds", "rows/s", "errors", "message"]
        parts.append("<h2>Runs</h2>" + _table(headers, [_run_row(r) for r in runs]))

    # Sample grid: rows spread evenly over the successful rows (not the first few), full maps for those only.
    map_names = list(view.maps)
    sample = view.read(view.schema.names, filter=_sample_filter(view, id_col, ids, errors, samples),
                       limit=samples).to_pylist()
    parts.append(f"<h2>Samples ({len(sample)} of {n_rows - len(failed)} successful rows, spread over the output)</h2>")
    for name, meta in view.maps.items():
        if meta.legend:
            swatches = "".join(
                f"<span class='swatch' style='background:rgb{rgb}'></span>{e(label)}" for label, rgb in _legend(meta)
            )
            parts.append(f"<p><b>{e(name)}</b> legend: {swatches}</p>")
    if any(m.kind == "depth" for m in view.maps.values()):
        parts.append("<p class='note'>Depth: near is red, far is blue (inverse depth for metres), sky / far black, "
                     "invalid grey; the range under each picture is its colour scale, shared by the depth maps of "
                     "a row (prediction and ground truth).</p>")
    grid_rows = []
    missing_inputs = 0
    row_previews = []
    bar_uri = png_data_uri(depth_colour_bar())
    for row in sample:
        pictures = row_pictures(view, row, rules)
        row_previews.append(pictures)
        missing_inputs += "input" not in pictures
        cells: list[Any] = [Markup(f"<b>{e(row.get(id_col) if id_col else '?')}</b>")]
        for name in ["input", *map_names]:
            cells.append(_picture_cell(name, pictures[name], bar_uri) if name in pictures else Markup("&ndash;"))
        grid_rows.append(cells)
    if missing_inputs and view.uri_column and input_config is None:
        parts.append(
            f"<p class='note'>{missing_inputs} input picture(s) not shown: inputs given by URI are read only "
            "where the viewer says; to show them, run <code>vb-batch report OUTPUT --allow-uri-prefix PREFIX"
            "</code> (and <code>--allow-private-addresses</code> for hosts on a private network).</p>"
        )
    parts.append("<div class='grid'>" + _table(["id", "input", *map_names], grid_rows) + "</div>")

    plots = _distributions(view, overview, summary_cols, row_previews)
    if plots:
        parts.append("<h2>Distributions</h2>" + "".join(f"<img alt='plot' src='{p}'> " for p in plots))

    parts.append("<h2>Errors</h2>")
    if failed:
        by_code: dict[str, list] = {}
        for row_id, err in failed:
            code, message = _error_parts(err)
            by_code.setdefault(code, []).append((row_id, message))
        rows = [[code, len(items), Markup("<br>".join(f"{e(i)}: {e(m)}" for i, m in spread(items, 3)))]
                for code, items in sorted(by_code.items(), key=lambda kv: -len(kv[1]))]
        parts.append(_table(["code", "rows", "examples"], rows))
    else:
        parts.append("<p class='ok'>No row failed.</p>")

    def distinct(column: str) -> str:
        values = overview.column(column).to_pylist() if column in overview.column_names else []
        return ", ".join(sorted({str(v) for v in values if v is not None}))

    meta = view.schema.metadata or {}
    parts.append("<h2>Provenance</h2>" + _table(["key", "value"], [
        ["vb_batch version", meta.get(b"vb.version", b"?").decode("utf-8", "replace")],
        ["model(s)", distinct("vb_model")],
        ["runs", distinct("vb_run_id")],
    ]))
    field_rows = [[n, m.kind, m.encoding, m.unit, m.scale if m.scale is not None else "", m.frame or ""]
                  for n, m in view.maps.items()]
    parts.append(_table(["column", "kind", "encoding", "unit", "scale", "frame"], field_rows))
    # Masked again: an output written before masking covered URLs and headers keeps them here.
    parts.append("<h2>Config</h2><pre>" + e(json.dumps(redact(view.job), indent=2, default=str)) + "</pre>")
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">"
            f"<title>vb-batch report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(
    path: str, storage: StorageOptions | None = None, samples: int = 12, input_config: InputConfig | None = None,
    *, allow_uri_prefixes: list[str] | None = None, allow_private_addresses: bool = False,
) -> str:
    """(Re)write `<path>/_report.html`; returns where it went.

    The job that wrote the output passes its own `input_config=cfg.input`; see `build_report`.
    """
    text = build_report(path, storage, samples, input_config,
                        allow_uri_prefixes=allow_uri_prefixes, allow_private_addresses=allow_private_addresses)
    fs, root = fsspec_filesystem(path, storage)
    target = posixpath.join(root, REPORT_NAME)
    fs.pipe_file(target, text.encode())
    return target if "://" not in path else path.rstrip("/") + "/" + REPORT_NAME


def _file_name(text: Any) -> str:
    """A name from the output (an id, a column) as one part of a file name: no separator can make it a path."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))[:100] or "_"


def show_row(
    path: str, row_id: str, out_dir: str | Path = "previews", storage: StorageOptions | None = None,
    *, max_side: int = SHOW_SIDE, allow_uri_prefixes: list[str] | None = None, allow_private_addresses: bool = False,
) -> list[Path]:
    """Write the input and preview PNGs of one row to `out_dir`, at most `max_side` pixels long (0: full size).

    Returns the files. A depth preview has its colour bar and range (near, far) under it;
    the row's depth maps share that range. URI inputs are read only under `allow_uri_prefixes`
    (`OutputView.uri_rules`; the output never chooses them). `vb_batch.show` is this.
    """
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
    written = []
    rules = view.uri_rules(allow_uri_prefixes, allow_private_addresses)
    for name, picture in row_pictures(view, row, rules, max_side).items():
        # Column names come from the output's schema: never a path of their own.
        target = out_dir / f"{_file_name(row_id)}_{_file_name(name)}.png"
        rgb = picture.rgb
        if picture.value_range is not None:
            rgb = with_colour_bar(rgb, picture.value_range, picture.unit)
        Image.fromarray(rgb).save(target)
        written.append(target)
    return written


class _CallableModule(types.ModuleType):
    """`vb_batch.report(OUTPUT, ...)` writes the report: the module's name is also the Python twin of the command."""

    def __call__(self, path: str, storage: StorageOptions | None = None, samples: int = 12, **options: Any) -> str:
        return write_report(path, storage, samples, **options)


sys.modules[__name__].__class__ = _CallableModule
