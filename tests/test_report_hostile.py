"""A report built from an output someone else wrote: its files are data, never instructions.

The output is written by a real job (identity model), then rewritten the way an attacker
would: script payloads in the run records, the schema metadata (`vb.job`, `vb.version`), the
field metadata (legend names and colours, units), a map column's name, ids, error codes and
messages, provenance. The report is opened in a real headless Chromium; nothing may run.
Stored URI rules are counted against a real loopback HTTP server: they never widen a fetch.
"""

from __future__ import annotations

import json
import logging
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import known_maps, png_bytes
from test_report import browse

import vb_batch
from vb_batch.cli import main
from vb_batch.codecs import depth, segmentation
from vb_batch.config import load_config
from vb_batch.report import CONTENT_SECURITY_POLICY, REPORT_NAME, build_report, write_report

# Whatever runs writes this marker into the title and the console; the source spells it in
# two halves so that only execution can assemble it.
MARKER = "PW" + "NED"
JS = "document.title='PW'+'NED';console.log('PW'+'NED')"
PAYLOADS = [
    f"<script>{JS}</script>",
    f'"><img src=x onerror="{JS}">',
    f"'><img src=x onerror='{JS}'>",
    f"javascript:{JS}",
    f"</style><script>{JS}</script>",
    f'<svg onload="{JS}"></svg>',
    f"</pre></td></table><script>{JS}</script>",
    f'<iframe src="javascript:{JS}"></iframe>',
    f'<a href="javascript:{JS}">x</a>',
    f"<base href='http://127.0.0.1:9/'><meta http-equiv='refresh' content='0;url=javascript:{JS}'>",
]
HOSTILE_COLOURS = [f"</style><script>{JS}</script>", [999, -1, 0], [1, 2, f"3);background:url(javascript:{JS})"]]
# What the report is made of: anything else in its DOM was injected.
REPORT_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "span", "b", "br",
               "div", "table", "tbody", "tr", "th", "td", "img", "pre"}


class Elements(HTMLParser):
    """Every element of a serialised DOM with its attributes (text nodes are not elements)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def payload(i: int) -> str:
    return PAYLOADS[i % len(PAYLOADS)] + f" #{i}"


def rewrite_part(path, legend_size: int) -> None:
    """One part file with every string an attacker controls replaced by payloads."""
    table = pq.read_table(path)
    n = table.num_rows
    job = {"input": {"path": payload(0), "id_column": "id"}, "model": {"backend": payload(1)}, payload(2): payload(3),
           "output": {"path": payload(4)}}
    fields = []
    for field in table.schema:
        meta = dict(field.metadata or {})
        name = field.name
        if field.name == "depth":
            meta[b"vb.unit"] = ("$\\frac{" + payload(5)).encode()  # matplotlib mathtext, too
        if field.name == "segmentation":
            legend = [[payload(6 + k), HOSTILE_COLOURS[k % len(HOSTILE_COLOURS)]] for k in range(legend_size)]
            meta[b"vb.legend"] = json.dumps(legend).encode()
            name = payload(9)  # a map column named by the attacker
        fields.append(pa.field(name, field.type, metadata=meta or None))
    columns = {f.name: table.column(i) for i, f in enumerate(fields)}
    columns["id"] = pa.array([payload(i) for i in range(n)])
    columns["vb_model"] = pa.array([payload(1)] * n)
    columns["vb_run_id"] = pa.array([payload(2)] * n)
    errors = table.column("vb_error").to_pylist()
    columns["vb_error"] = pa.array(
        [None if e is None else {"code": payload(7), "message": payload(8)} for e in errors],
        table.schema.field("vb_error").type,
    )
    schema = pa.schema(
        [f.with_type(columns[f.name].type) for f in fields],
        metadata={**table.schema.metadata, b"vb.job": json.dumps(job).encode(), b"vb.version": payload(3).encode()},
    )
    pq.write_table(pa.table([columns[f.name] for f in fields], schema=schema), path)


@pytest.fixture
def hostile_output(tmp_path):
    legend = segmentation.Legend.from_names(["road", "car", "sky"])
    images = [png_bytes(depth.encode(known_maps(i, 24, 32, legend)["depth"])) for i in range(3)] + [b"not an image"]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(4)], "image": images}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary = vb_batch.annotate({
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(out), "report": False, "compression": "none"},
        "tasks": ["depth", "segmentation"],
        "segmentation": {"classes": legend.names},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    })
    assert summary.rows_ok == 3 and summary.rows_failed == 1, summary.render()
    parts = [p for p in out.rglob("*.parquet") if "_vb" not in p.parts]
    assert parts
    for part in parts:
        rewrite_part(part, len(legend))
    records = list((out / "_vb" / "runs").glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        record.update(run_id=payload(0), engine=payload(1), message=payload(2), errors_by_code={payload(3): 1},
                      rows_ok=payload(4), seconds=payload(5), rows_per_second=float("nan"), success="true")
        path.write_text(json.dumps(record))
    return out


@pytest.mark.slow  # ~2 s: a headless Chromium
def test_the_browser_runs_nothing_from_a_hostile_output(hostile_output, tmp_path):
    assert main(["report", str(hostile_output)]) == 0
    report = hostile_output / REPORT_NAME
    text = report.read_text()
    # Every payload reached the page (as text): the test exercises what it claims to.
    for i in range(len(PAYLOADS)):
        assert f" #{i}" in text
    assert "<script" not in text.lower()
    assert f"content=\"{CONTENT_SECURITY_POLICY}\"" in text

    # A control page proves these flags run scripts and that the marker shows when one runs.
    control = tmp_path / "control.html"
    control.write_text(f"<!doctype html><title>control</title><script>{JS}</script>")
    seen = browse(control.as_uri(), tmp_path / "p0", "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert Elements(seen.stdout).title == MARKER and MARKER in seen.stderr

    # The report as shipped, and without its Content-Security-Policy (escaping alone must hold).
    bare = tmp_path / "bare.html"
    bare.write_text(text.replace(f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">", ""))
    assert "Content-Security-Policy" not in bare.read_text()
    for page, profile in ((report, "p1"), (bare, "p2")):
        seen = browse(page.as_uri(), tmp_path / profile, "--dump-dom", "--enable-logging=stderr", "--v=0")
        dom = Elements(seen.stdout)
        assert dom.title == "vb-batch report", (page, seen.stderr[-2000:])
        assert MARKER not in seen.stdout and MARKER not in seen.stderr
        tags = {tag for tag, _ in dom.tags}
        assert tags <= REPORT_TAGS, tags - REPORT_TAGS
        for tag, attrs in dom.tags:
            assert not any(name.startswith("on") for name in attrs), (tag, attrs)
            if tag == "img":
                assert attrs["src"].startswith("data:image/png;base64,")
            if "style" in attrs:  # legend swatches: a colour from three ints, whatever the metadata said
                assert attrs["style"] == "background:rgb(128, 128, 128)", attrs["style"]
        # The sample grid still shows the maps of the 3 good rows, and the failed row's payload as text.
        assert sum(tag == "img" for tag, _ in dom.tags) >= 3 * 3


def test_numbers_and_colours_come_from_real_values_only(hostile_output):
    text = build_report(str(hostile_output))
    assert ">nan<" not in text.lower() and "<td>?</td>" in text  # rows_ok, seconds, rows/s were no numbers
    assert "rgb(128, 128, 128)" in text  # each hostile legend colour became the neutral grey


# ---------------------------------------------------------------------------- stored URI rules never widen


class Images:
    """A loopback HTTP server that serves one PNG for any path and counts the requests it gets."""

    def __init__(self):
        self.count = 0
        picture = png_bytes(np.full((16, 16, 3), 200, np.uint8))
        images = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                images.count += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(picture)))
                self.end_headers()
                self.wfile.write(picture)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def images():
    server = Images()
    yield server
    server.close()


@pytest.fixture
def loopback_output(tmp_path, images):
    """An output whose stored config allows loopback URIs: written by a job that was told so."""
    uris = [f"{images.prefix}img{i}.png" for i in range(3)]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "uri": uris}), tmp_path / "in.parquet")
    job = {
        "input": {"path": str(tmp_path / "in.parquet"), "uri_column": "uri", "allowed_prefixes": [images.prefix],
                  "allow_private_addresses": True},
        "output": {"path": str(tmp_path / "out"), "report": False},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }
    summary = vb_batch.annotate(job)
    assert summary.rows_ok == 3 and images.count == 3, summary.render()  # the job itself was allowed
    images.count = 0
    return tmp_path / "out", job


def test_report_ignores_stored_rules_that_widen_and_obeys_the_command_line(loopback_output, images, tmp_path):
    out, job = loopback_output
    report = out / REPORT_NAME
    assert main(["report", str(out)]) == 0
    assert images.count == 0 and "alt='input'" not in report.read_text()
    assert "--allow-uri-prefix" in report.read_text()  # the report says how to see them
    # The stored http prefix widens the input's own scheme (a local file): ignored, so the flag
    # for private addresses alone still fetches nothing; a prefix alone still refuses loopback.
    assert main(["report", str(out), "--allow-private-addresses"]) == 0
    assert images.count == 0
    assert main(["report", str(out), "--allow-uri-prefix", images.prefix]) == 0
    assert images.count == 0
    assert main(["report", str(out), "--allow-uri-prefix", images.prefix, "--allow-private-addresses"]) == 0
    assert images.count == 3 and report.read_text().count("alt='input'") == 3

    images.count = 0
    assert main(["show", str(out), "--id", "a", "--dir", str(tmp_path / "p1")]) == 0
    assert images.count == 0 and not (tmp_path / "p1" / "a_input.png").exists()
    assert main(["show", str(out), "--id", "a", "--dir", str(tmp_path / "p2"), "--allow-private-addresses",
                 "--allow-uri-prefix", images.prefix]) == 0
    assert images.count == 1 and (tmp_path / "p2" / "a_input.png").exists()

    # The job that wrote the output reports its own run under its live rules.
    images.count = 0
    write_report(str(out), samples=2, input_config=load_config(job).input)
    assert images.count == 2 and report.read_text().count("alt='input'") == 2


def test_show_keeps_files_inside_its_folder_whatever_the_column_names(hostile_output, tmp_path):
    target = tmp_path / "previews"
    assert main(["show", str(hostile_output), "--id", payload(0), "--dir", str(target)]) == 0
    written = list(target.iterdir())
    assert written and all(p.parent == target and p.name.endswith(".png") for p in written)
    assert len(written) == 3  # input, depth and the attacker-named mask column


# ---------------------------------------------------------------------------- the viewer's own files stay out


@pytest.fixture
def crafted_uri_output(tmp_path):
    """An output whose URI cells and stored config were rewritten to name the viewer's private files.

    (output folder, the viewer's home, its private photo's pixels, the secret texts.)
    """
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    photo = np.random.default_rng(31).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    (home / "photo.png").write_bytes(png_bytes(photo))
    secrets = {home / ".aws" / "config": b"[default]\naws_secret_access_key = hunter2-private\n",
               home / "passwd": b"root:x:0:0:root:/root:/bin/bash\n"}
    for path, text in secrets.items():
        path.write_bytes(text)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    uris = []
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(png_bytes(np.full((24, 32, 3), 60 * i, np.uint8)))
        uris.append(str(imgs / f"{i}.png"))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "uri": uris}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary = vb_batch.annotate({"input": {"path": str(tmp_path / "in.parquet"), "uri_column": "uri"},
                                 "output": {"path": str(out), "report": False},
                                 "model": {"backend": "identity"}, "run": {"progress": False}})
    assert summary.rows_ok == 3, summary.render()
    crafted = [str(home / "photo.png"), (home / ".aws" / "config").as_uri(), str(home / "passwd")]
    stored = {"input": {"path": str(home), "uri_column": "uri", "allowed_prefixes": [str(home)]}}
    for part in [p for p in out.rglob("*.parquet") if "_vb" not in p.parts]:
        table = pq.read_table(part)
        table = table.set_column(table.schema.get_field_index("uri"), table.schema.field("uri"), pa.array(crafted))
        meta = {**table.schema.metadata, b"vb.job": json.dumps(stored).encode()}
        pq.write_table(table.replace_schema_metadata(meta), part)
    return out, home, photo, [text.split(b"\n")[0][:8] for text in secrets.values()]


def picture_arrays(text: str) -> list[np.ndarray]:
    """Every picture inlined in a report, as pixels."""
    import base64
    import io
    import re

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
            for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def shows_photo(pictures: list[np.ndarray], photo: np.ndarray) -> bool:
    return any(p.shape == photo.shape and np.array_equal(p, photo) for p in pictures)


def test_report_and_show_of_a_crafted_output_never_read_the_viewers_files(crafted_uri_output, tmp_path, caplog, capsys):
    out, home, photo, secret_heads = crafted_uri_output
    with caplog.at_level(logging.DEBUG):
        # The defaults, then the viewer's own prefix for its images (the crafted cells lie outside it).
        for flags in ([], ["--allow-uri-prefix", str(tmp_path / "imgs")]):
            assert main(["report", str(out), *flags]) == 0
            text = (out / REPORT_NAME).read_text()
            assert "alt='input'" not in text and not shows_photo(picture_arrays(text), photo)
            assert len(picture_arrays(text)) >= 3  # the maps, read from the output, are still there
            target = tmp_path / f"show{len(flags)}"
            assert main(["show", str(out), "--id", "a", "--dir", str(target), *flags]) == 0
            assert sorted(p.name for p in target.iterdir()) == ["a_depth.png"]
        # Named by the viewer, knowingly: the photo is shown; the text files are refused without a byte of them.
        assert main(["report", str(out), "--allow-uri-prefix", str(home)]) == 0
        text = (out / REPORT_NAME).read_text()
        assert text.count("alt='input'") == 1 and shows_photo(picture_arrays(text), photo)
    seen = caplog.text + "".join(capsys.readouterr())
    assert "not a recognised image format" in seen  # the text files were read only once the viewer said so
    for head in secret_heads:
        assert head.decode() not in seen and head.decode() not in text
    assert "hunter2" not in seen and "hunter2" not in text
