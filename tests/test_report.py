"""The HTML run report in a real headless Chromium, and per-row previews."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import known_maps, png_bytes
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
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', broken.length);
  document.body.setAttribute('data-scripts', doc.scripts.length);
});
</script></body></html>"""


def inspect_report(report: Path, profile) -> dict[str, int]:
    """{images, broken, scripts} of `report` as Chromium loaded it (over loopback HTTP, same origin)."""
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
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)" data-scripts="(\d+)"', dom.stdout)
    assert body, dom.stderr[-2000:]
    return dict(zip(("images", "broken", "scripts"), map(int, body.groups())))


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
    # 4 samples x (input + depth + normals + segmentation) + 2 depth histograms + class fractions,
    # every one loaded under the report's Content-Security-Policy; and not one script.
    assert seen == {"images": 4 * 4 + 3, "broken": 0, "scripts": 0}
    shot = tmp_path / "report.png"
    browse(report.as_uri(), tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1600")
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (1600, 1200)
    assert picture.std() > 10  # not a blank page


def test_report_command_and_show(annotated, tmp_path, capsys):
    out, _ = annotated
    (out / REPORT_NAME).unlink()
    assert main(["report", str(out), "--samples", "2"]) == 0
    assert (out / REPORT_NAME).exists()
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
    """Inputs given by URI appear in the report, read through the job's URI safety checks."""
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
    assert view.input_image({"uri": str(inside)}) is not None
    assert view.input_image({"uri": str(outside)}) is None  # the stored prefixes (narrower) refuse it: never read
