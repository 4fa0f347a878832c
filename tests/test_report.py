"""The HTML run report in a real headless Chromium, and per-row previews."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import known_maps, png_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vb_batch
from vb_batch.cli import main
from vb_batch.codecs import depth, segmentation
from vb_batch.report import REPORT_NAME

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the report test: `make test` installs it (apt-get install chromium)"
    return path


def browse(url: str, profile, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# The report runs no script (its Content-Security-Policy forbids them), so a page of the test's
# own, served with it from one loopback origin, looks into it through an iframe: the report
# loads exactly as it would alone, under its own policy.
INSPECTOR = """<!doctype html><html><body><iframe id="report" src="%s" width="1200" height="900"></iframe><script>
document.getElementById('report').addEventListener('load', function () {
  var doc = this.contentDocument, imgs = Array.prototype.slice.call(doc.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  // Per sample row: each depth preview's range and whether a loaded, visible colour bar follows it.
  var rows = Array.prototype.slice.call(doc.querySelectorAll('.grid tr')).map(function (tr) {
    return Array.prototype.slice.call(tr.querySelectorAll('img.depth-map')).map(function (img) {
      var bar = img.nextElementSibling, range = bar && bar.nextElementSibling;
      return {column: img.alt, near: img.dataset.near, far: img.dataset.far, unit: img.dataset.unit,
              bar: !!(bar && bar.classList.contains('colour-bar') && bar.naturalWidth > 0 && bar.clientHeight > 0),
              range: range ? range.textContent : ''};
    });
  }).filter(function (r) { return r.length; });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', broken.length);
  document.body.setAttribute('data-scripts', doc.scripts.length);
  document.body.setAttribute('data-depth', JSON.stringify(rows));
});
</script></body></html>"""


def inspect_report(report: Path, profile) -> dict[str, Any]:
    """{images, broken, scripts, depth} of `report` as Chromium loaded it (over loopback HTTP, same origin).

    depth: per sample row, its depth previews as {column, near, far, unit, bar, range}.
    """
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (report.parent / "_inspect.html").write_text(INSPECTOR % report.name)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(report.parent)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        dom = browse(f"http://127.0.0.1:{server.server_address[1]}/_inspect.html", profile, "--dump-dom")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        (report.parent / "_inspect.html").unlink()
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)" data-scripts="(\d+)" data-depth="([^"]*)"',
                     dom.stdout)
    assert body, dom.stderr[-2000:]
    seen: dict[str, Any] = dict(zip(("images", "broken", "scripts"), map(int, body.groups()[:3])))
    seen["depth"] = json.loads(html.unescape(body.group(4)))
    return seen


@pytest.fixture
def annotated(tmp_path):
    legend = segmentation.Legend.from_names(["road", "car", "sky"])
    rows = []
    for i in range(5):
        maps = known_maps(i, 24, 32, legend)
        # Each row paints depth; the identity model answers it for every task.
        rows.append(png_bytes(depth.encode(maps["depth"])))
    rows.append(b"broken bytes")
    pq.write_table(pa.table({"id": list(range(6)), "image": rows}), tmp_path / "in.parquet")
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "report_samples": 4},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"classes": legend.names},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }
    summary = vb_batch.annotate(cfg)
    return tmp_path / "out", summary


@pytest.mark.slow
def test_report_opens_in_chromium_with_every_image(annotated, tmp_path):
    out, summary = annotated
    report = out / REPORT_NAME
    assert summary.report.endswith(REPORT_NAME) and report.exists()
    text = report.read_text()
    assert "not_image" in text  # the error table names the failed row's code
    seen = inspect_report(report, tmp_path / "profile1")
    # 4 samples x (input + depth + its colour bar + normals + segmentation) + 2 depth histograms + class
    # fractions, every one loaded under the report's Content-Security-Policy; and not one script.
    depth_rows = seen.pop("depth")
    assert seen == {"images": 4 * 5 + 3, "broken": 0, "scripts": 0}
    assert len(depth_rows) == 4 and all(len(r) == 1 and r[0]["bar"] and r[0]["unit"] == "m" for r in depth_rows)
    for (preview,) in depth_rows:
        assert 0 < float(preview["near"]) < float(preview["far"])
        assert preview["near"] in preview["range"] and preview["far"] in preview["range"]
    shot = tmp_path / "report.png"
    browse(report.as_uri(), tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1600")
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (1600, 1200)
    assert picture.std() > 10  # not a blank page


def grid_ids(report: Path) -> list[str]:
    grid = report.read_text().split("<div class='grid'>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r"<tr><td><b>([^<]*)</b></td>", grid)


def test_report_command_and_show(annotated, tmp_path, capsys):
    out, _ = annotated
    (out / REPORT_NAME).unlink()
    assert main(["report", str(out), "--samples", "2"]) == 0
    assert (out / REPORT_NAME).exists()
    # Spread over the 5 successful rows (0..4; row 5 failed): the first and the last, not the first two.
    assert sorted(grid_ids(out / REPORT_NAME)) == ["0", "4"]
    assert main(["report", str(out), "--samples", "4"]) == 0
    assert sorted(grid_ids(out / REPORT_NAME)) == ["0", "1", "3", "4"]
    assert main(["show", str(out), "--id", "3", "--dir", str(tmp_path / "prev")]) == 0
    files = sorted(p.name for p in (tmp_path / "prev").iterdir())
    assert files == ["3_depth.png", "3_input.png", "3_normals.png", "3_segmentation.png"]
    assert Image.open(tmp_path / "prev" / "3_input.png").size == (32, 24)
    assert main(["show", str(out), "--id", "99", "--dir", str(tmp_path / "prev")]) == 1
    assert "no row" in capsys.readouterr().err


def test_depth_preview_colours_near_warm_and_far_black():
    from vb_batch.previews import colorize_depth

    d = np.array([[1.0, 2.0, 50.0, np.inf, np.nan]], np.float32)
    rgb = colorize_depth(d)
    assert tuple(rgb[0, 3]) == (0, 0, 0) and tuple(rgb[0, 4]) == (128, 128, 128)
    assert rgb[0, 0, 0] > rgb[0, 0, 2]  # near: red dominates
    assert rgb[0, 2, 2] > rgb[0, 2, 0]  # far: blue dominates


def test_report_fetches_uris_under_the_jobs_own_rules(tmp_path):
    """Inputs given by URI appear in the job's own report, read through its URI safety checks; read back, only
    where the viewer says."""
    from vb_batch.demo import make_sample_images
    from vb_batch.io.outputs import OutputView

    make_sample_images(tmp_path / "imgs", 3)
    job_input = {"path": str(tmp_path / "imgs"), "allowed_prefixes": [str(tmp_path / "imgs")]}
    summary = vb_batch.annotate({"input": job_input, "output": {"path": str(tmp_path / "out")},
                                 "model": {"backend": "identity"}, "run": {"progress": False}})
    assert (tmp_path / "out" / REPORT_NAME).read_text().count("alt='input'") == 3
    view = OutputView(summary.output)
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))  # a real image, outside the input folder
    inside = next((tmp_path / "imgs").iterdir())
    assert view.input_image({"uri": str(inside)}) is None  # read back, a URI is fetched only where the viewer says
    rules = view.uri_rules([str(tmp_path / "imgs")])
    assert view.input_image({"uri": str(inside)}, rules) is not None
    assert view.input_image({"uri": str(outside)}, rules) is None  # outside the viewer's prefix: never read


@pytest.mark.slow
def test_truth_and_prediction_of_a_row_share_one_colour_range_in_chromium(tmp_path):
    """A row's predicted depth and its ground truth (vb.role = truth) are coloured on one scale, with a bar."""
    from vb_batch.scenes import scene_table

    pq.write_table(scene_table(range(1_000_000, 1_000_003), size=(24, 32)), tmp_path / "scenes.parquet")
    summary = vb_batch.annotate({
        "input": {"path": str(tmp_path / "scenes.parquet"), "image_column": "image"},
        "output": {"path": str(tmp_path / "out"), "report_samples": 3},
        "model": {"backend": "identity"}, "run": {"progress": False},
    })
    assert summary.rows_ok == 3
    rows = inspect_report(tmp_path / "out" / REPORT_NAME, tmp_path / "profile")["depth"]
    assert len(rows) == 3
    for previews in rows:
        assert sorted(p["column"] for p in previews) == ["depth", "gt_depth"]
        assert all(p["bar"] and p["unit"] == "m" for p in previews)
        # One range per row for truth and prediction (the identity model's depth is far from the truth).
        assert len({(p["near"], p["far"]) for p in previews}) == 1
    assert len({(r[0]["near"], r[0]["far"]) for r in rows}) > 1  # ... and each row its own


def test_previews_are_thinned_before_they_are_coloured(annotated, monkeypatch):
    """Colourising costs per pixel: the report colours thumbnails, never full-resolution maps."""
    import vb_batch.report_pictures as report
    from vb_batch.io.outputs import OutputView

    out, _ = annotated
    view = OutputView(str(out))
    row = view.read(view.schema.names, limit=1).to_pylist()[0]
    coloured = []
    real = report.colorize_depth
    monkeypatch.setattr(report, "colorize_depth", lambda values, *a: coloured.append(values.shape) or real(values, *a))
    pictures = report.row_pictures(view, row, max_side=8)
    assert coloured == [(6, 8)]  # 24 x 32 thinned by 4
    assert all(max(p.rgb.shape[:2]) <= 8 for p in pictures.values())
    assert pictures["depth"].value_range is not None


def test_show_writes_bounded_previews_with_a_colour_bar(tmp_path):
    from vb_batch.codecs import depth as depth_codec

    yy, xx = np.mgrid[0:600, 0:900].astype(np.float32)
    painted = depth_codec.encode(1.0 + xx / 100 + yy / 200)
    pq.write_table(pa.table({"id": ["big"], "image": [png_bytes(painted)]}), tmp_path / "in.parquet")
    vb_batch.annotate({"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out"),
                       "report": False}, "model": {"backend": "identity"}, "run": {"progress": False}})
    assert main(["show", str(tmp_path / "out"), "--id", "big", "--dir", str(tmp_path / "a"), "--max-side", "300"]) == 0
    assert Image.open(tmp_path / "a" / "big_input.png").size == (300, 200)
    shown = Image.open(tmp_path / "a" / "big_depth.png")
    assert shown.size == (300, 200 + 26)  # the preview, its colour bar and the range written under it
    bar = np.asarray(shown.convert("RGB"))[205]
    assert bar[0, 0] > bar[0, 2] and bar[-1, 2] > bar[-1, 0]  # near red on the left, far blue on the right
    files = vb_batch.show(str(tmp_path / "out"), "big", tmp_path / "b")  # default: at most 1024 pixels long
    assert Image.open(tmp_path / "b" / "big_input.png").size == (900, 600) and len(files) == 2


# (3, 30) and (1.2, 2.5) metres overlapped before: matplotlib labels the minor ticks of a short log axis.
@pytest.mark.parametrize("low, high, log_x", [(0.3, 80.0, True), (3.0, 30.0, True), (1.2, 2.5, True), (0.05, 900.0, True),
                                              (0.0, 1.0, False), (1e3, 5e6, False)])
def test_histogram_tick_labels_do_not_overlap(low, high, log_x):
    from vb_batch.report import histogram_figure

    values = np.random.default_rng(0).uniform(low, high, 5000)
    fig = histogram_figure(values, "depth", "m", log_x=log_x)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in (fig.axes[0].xaxis, fig.axes[0].yaxis):
        low_view, high_view = sorted(axis.get_view_interval())
        drawn = [t.label1 for t in axis.get_major_ticks() + axis.get_minor_ticks()
                 if low_view <= t.get_loc() <= high_view and t.label1.get_visible() and t.label1.get_text()]
        boxes = [label.get_window_extent(renderer) for label in drawn]
        assert len(boxes) >= 2, [label.get_text() for label in drawn]
        ordered = sorted(boxes, key=lambda b: (b.x0, b.y0))
        assert not any(a.overlaps(b) for i, a in enumerate(ordered) for b in ordered[i + 1:]), axis


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), count=st.integers(0, 30))
def test_spread_is_an_even_ordered_subset(n, count):
    from vb_batch.report import spread

    items = list(range(n))
    chosen = spread(items, count)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(items)
    assert len(chosen) == min(n, count)
    if count >= 2 and n >= 2:
        assert chosen[0] == 0 and chosen[-1] == n - 1
        gaps = np.diff(chosen)
        assert gaps.max() - gaps.min() <= 1  # evenly spaced
