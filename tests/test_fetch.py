"""Fetching image URIs safely: any cell is a per-row error at worst, redirects are checked hop by hop,
bytes and time are bounded, local reads touch regular files only. Real servers and files throughout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_uris import (
    IMAGE,
    MALFORMED_URIS,
    HostileServer,
    StallingEndpoint,
    make_fifo,
    public_names,
    self_signed_certificate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io import fetch
from vb_batch.io import http as transport
from vb_batch.io.fetch import check_uri, read_uri

REPO = Path(__file__).resolve().parents[1]


def config(**kw) -> InputConfig:
    return InputConfig(path="/data/table.parquet", **kw)


def code_of(call, *args) -> str | None:
    try:
        call(*args)
    except RowError as err:
        assert err.message, "an error message is never empty"
        return err.code
    return None


@pytest.fixture(scope="module")
def server():
    with HostileServer() as running:
        yield running


@pytest.fixture
def fresh_server():
    """A server of one's own, for tests that count its hits."""
    with HostileServer() as running:
        yield running


# ---------------------------------------------------------------------------- any cell


@pytest.mark.parametrize("row_id", sorted(MALFORMED_URIS))
def test_malformed_cells_are_row_errors(row_id, tmp_path):
    cell, code = MALFORMED_URIS[row_id]
    cfg = config(allowed_prefixes=[str(tmp_path), "http://", "https://", "s3://", "file://"])
    assert code_of(check_uri, cell, cfg) == code
    assert code_of(read_uri, cell, cfg) == code


SCHEMES = [
    "", "http", "HTTP", "hTtPs", "file", "FILE", "local", "LOCAL", "s3", "S3", "s3a", "gs", "ftp", "data", "javascript",
    "c", "x-y+z.w",
]
SEPARATORS = ["://", ":", ":/", ":///", ":////", "", "//", ":\\\\", "::"]
HOSTS = [
    "", "127.0.0.1", "localhost", "[::1]", "[::1", "::1]", "[fe80::1%25eth0]", "169.254.169.254", "0x7f.1",
    "2130706433", "user:pw@host", "a@b@c", "ä.example", "xn--", "-bad-", "bucket", "%00", "host:", "host:0",
    "host:65536", "host:-1", "a" * 300, "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "HOST.Example.",
]
PATHS = [
    "", "/", "/x.png", "/..", "/../../etc/passwd", "/%2e%2e/%2E%2e/x", "/a%2Fb", "/a%00b", "/\x00", "/ä/ö.png",
    "/a b.png", "%", "%zz", "?q=1&sig=secret", "#frag", "/dev/zero", "\\..\\x", "/\ud800", "/" + "a/" * 3000,
    "/\r\nHost: evil", "/./a/./b/../c", "//", ";params", "/%C0%AE%C0%AE/", "/\u202e.png",
]


def hostile_strings(bases: list[str]):
    """Cells built from adversarial pieces, and the same paths under places that exist (`bases`)."""
    pieces = st.tuples(
        st.sampled_from(SCHEMES),
        st.sampled_from(SEPARATORS),
        st.sampled_from(HOSTS),
        st.lists(st.sampled_from(PATHS), max_size=3),
    ).map(lambda t: t[0] + t[1] + t[2] + "".join(t[3]))
    real_places = st.tuples(st.sampled_from(bases), st.lists(st.sampled_from(PATHS + ["/x.png"]), max_size=3))
    return st.one_of(
        pieces,
        real_places.map(lambda t: t[0] + "".join(t[1])),
        pieces.flatmap(lambda s: st.text(max_size=8).map(lambda noise: s + noise)),
        st.text(max_size=60),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=30).map(lambda t: "http://" + t),
        st.none(),
        st.integers(),
        st.binary(max_size=20),
        st.floats(),
        st.lists(st.text(max_size=5), max_size=2),
    )


def is_url(cell: object) -> bool:
    """A cell with a scheme other than file: (a local path may hold "?" as a plain character)."""
    match = isinstance(cell, str) and re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", cell)
    return bool(match) and match.group(1).lower() not in ("file", "local")


@pytest.mark.slow  # ~3.5 s: a property test over real servers
def test_any_cell_gives_a_row_error_or_bytes(tmp_path, server):
    """Random and adversarial cells through check_uri and read_uri: nothing but RowError escapes.

    No DNS: every name resolves (as public) to 127.0.0.1, where only the hostile server's port
    answers (404 for these paths, 501 for S3's requests).
    """
    (tmp_path / "x.png").write_bytes(IMAGE)
    broad = config(
        allowed_prefixes=[str(tmp_path), "http://", "https://", "s3://", "gs://", "ftp://", "file:///dev/null"]
    )
    reading = config(
        allowed_prefixes=[str(tmp_path), "http://", "https://", "s3://"],
        allow_private_addresses=True,
        storage={"endpoint_url": server.base, "anonymous": True, "max_attempts": 1, "timeout_s": 1.0},
    )
    seen: set[str] = set()
    read_count: list[int] = []

    def everywhere_loopback(host: str, port: int) -> list[fetch.Address]:
        return [fetch.Address("127.0.0.1", internal=False)]

    bases = [
        f"http://127.0.0.1:{server.port}", f"HTTP://localhost:{server.port}", str(tmp_path), f"file://{tmp_path}",
        "s3://bucket",
    ]

    @settings(max_examples=3000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(hostile_strings(bases))
    def run(cell):
        for call, cfg in ((check_uri, broad), (read_uri, reading)):
            try:
                result = call(cell, cfg)
            except RowError as err:
                assert err.code and err.message
                if is_url(cell):
                    assert "secret" not in err.message, err.message  # query strings are never shown
                seen.add(err.code)
            else:
                assert isinstance(result, (str, bytes))
                if call is read_uri:
                    read_count.append(1)

    real = fetch.resolve
    fetch.resolve = everywhere_loopback
    try:
        run()
    finally:
        fetch.resolve = real
    # The run reached the interesting outcomes, not just one early refusal.
    assert {"null_uri", "uri_invalid", "uri_not_allowed", "not_found", "fetch_error"} <= seen, seen
    assert read_count, "some cells were read"


# ---------------------------------------------------------------------------- http(s)


def test_http_image_and_redirect_chain_are_read(server):
    cfg = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True)
    assert read_uri(server.url("/image.png"), cfg) == IMAGE
    assert read_uri(server.url("/chain/5"), cfg) == IMAGE  # 5 hops: the most that are followed


def test_redirect_outside_allowed_prefixes_is_refused_before_it_is_requested(fresh_server):
    prefixes = [fresh_server.url("/redirect"), fresh_server.url("/chain")]
    cfg = config(allowed_prefixes=prefixes, allow_private_addresses=True)
    for uri, hop in [
        (fresh_server.redirect_url(fresh_server.url("/image.png")), "/image.png"),  # same server, another path
        (fresh_server.redirect_url("http://169.254.169.254/latest/meta-data/iam"), "169.254.169.254"),
        (fresh_server.redirect_url(fresh_server.url("/image.png", host="localhost")), "localhost"),
        (fresh_server.redirect_url("file:///etc/passwd"), "file"),
    ]:
        with pytest.raises(RowError) as info:
            read_uri(uri, cfg)
        assert info.value.code == "uri_not_allowed"
        assert "redirect from" in info.value.message and hop in info.value.message, info.value.message
    assert fresh_server.hits and all(hit.startswith("/redirect?") for hit in fresh_server.hits)


def test_redirect_to_loopback_is_refused_when_the_first_hop_was_public(fresh_server):
    port = fresh_server.port
    cfg = config(allowed_prefixes=[f"http://images.test:{port}/", f"http://cdn.test:{port}/", fresh_server.url("/")])
    with public_names({"images.test": "127.0.0.1", "cdn.test": "127.0.0.1"}):
        # The first hop is public and read for real, through the address that was checked: the
        # name does not resolve anywhere else, and the Host header keeps the name.
        assert read_uri(f"http://images.test:{port}/image.png", cfg) == IMAGE
        assert fresh_server.headers[-1]["Host"] == f"images.test:{port}"
        with pytest.raises(RowError) as info:
            read_uri(f"http://images.test:{port}/redirect?to={fresh_server.url('/image.png')}", cfg)
    assert info.value.code == "uri_not_allowed"
    assert "internal address 127.0.0.1" in info.value.message and "redirect from" in info.value.message
    assert fresh_server.hits == ["/image.png", fresh_server.hits[1]] and fresh_server.hits[1].startswith("/redirect?")


def test_https_connects_to_the_checked_address_with_the_host_name_for_tls(tmp_path, monkeypatch):
    """The socket goes to the address that was checked; TLS still names (SNI) and verifies the host."""
    cert, key = self_signed_certificate(tmp_path, "images.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust this certificate alone
    transport.tls_context.cache_clear()
    try:
        names = {"images.test": "127.0.0.1", "cdn.test": "127.0.0.1"}
        with HostileServer(tls=(cert, key)) as server, public_names(names):
            cfg = config(allowed_prefixes=["https://"])
            assert read_uri(f"https://images.test:{server.port}/image.png", cfg) == IMAGE
            assert server.headers[-1]["Host"] == f"images.test:{server.port}"
            with pytest.raises(RowError) as info:  # the same address, under a name the certificate does not have
                read_uri(f"https://cdn.test:{server.port}/image.png", cfg)
            assert info.value.code == "fetch_error" and "TLS certificate not trusted" in info.value.message
    finally:
        transport.tls_context.cache_clear()


def test_credentials_in_a_url_go_to_its_origin_only(fresh_server):
    port = fresh_server.port
    cfg = config(allowed_prefixes=["http://"])
    with public_names({"images.test": "127.0.0.1", "cdn.test": "127.0.0.1"}):
        target = f"http://cdn.test:{port}/image.png"
        assert read_uri(f"http://user:pw@images.test:{port}/redirect?to={target}", cfg) == IMAGE
    first, second = fresh_server.headers
    assert first["Authorization"] == "Basic dXNlcjpwdw=="  # user:pw
    assert "Authorization" not in second and second["Host"] == f"cdn.test:{port}"


def test_redirect_loop_stops(fresh_server):
    cfg = config(allowed_prefixes=[fresh_server.url("/")], allow_private_addresses=True)
    with pytest.raises(RowError) as info:
        read_uri(fresh_server.url("/loop"), cfg)
    assert info.value.code == "fetch_error" and "more than 5 redirects" in info.value.message
    assert len(fresh_server.hits) == 6


@pytest.mark.parametrize(
    "status, code", [(404, "not_found"), (410, "not_found"), (403, "permission_denied"), (500, "fetch_error")]
)
def test_http_status_codes(server, status, code):
    cfg = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True)
    with pytest.raises(RowError) as info:
        read_uri(server.url(f"/status/{status}?X-Amz-Signature=secret123"), cfg)
    assert info.value.code == code and str(status) in info.value.message
    assert "secret123" not in info.value.message and "/status/" in info.value.message


def test_oversized_bodies_are_refused_while_streaming(server):
    cfg = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True, max_bytes=1_000_000)
    for path in ("/huge-declared", "/huge"):
        start = time.monotonic()
        with pytest.raises(RowError) as info:
            read_uri(server.url(path), cfg)
        assert info.value.code == "too_large" and "input.max_bytes=1000000" in info.value.message
        assert time.monotonic() - start < 5
    exact = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True, max_bytes=len(IMAGE))
    assert read_uri(server.url("/image.png"), exact) == IMAGE


MEASURE_RSS = """
import json, resource, sys
from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.fetch import read_uri
url, max_bytes = sys.argv[1], int(sys.argv[2])
cfg = InputConfig(path="t.parquet", allowed_prefixes=[url], allow_private_addresses=True, max_bytes=max_bytes)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_uri(url, cfg)
    code = None
except RowError as err:
    code = err.code
print(json.dumps({"code": code, "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_1_gib_body_keeps_memory_bounded(server):
    """The server streams 1 GiB without a Content-Length; the fetch stops at max_bytes (16 MB here)."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, server.url("/huge"), str(16_000_000)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )
    measured = json.loads(result.stdout)
    assert measured["code"] == "too_large"
    assert measured["growth_mb"] < 48, measured  # 16 MB held, at most; the unbounded read peaked at 2.3 GB


def test_stalling_server_fails_the_row_within_the_timeout(server):
    cfg = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True, storage={"timeout_s": 1.0})
    start = time.monotonic()
    with pytest.raises(RowError) as info:
        read_uri(server.url("/stall?token=secret"), cfg)
    assert time.monotonic() - start < 3
    assert info.value.code == "fetch_timeout"
    assert info.value.message == f"{server.url('/stall')}: no data for 1 s (input.storage.timeout_s)"


@pytest.mark.slow  # 4 s: waits out its deadline
def test_dripping_server_fails_the_row_at_the_deadline(server):
    """A byte every 0.3 s never trips the 1 s read timeout; the total deadline (4 x 1 s) ends it."""
    cfg = config(allowed_prefixes=[server.url("/")], allow_private_addresses=True, storage={"timeout_s": 1.0})
    start = time.monotonic()
    with pytest.raises(RowError) as info:
        read_uri(server.url("/drip"), cfg)
    elapsed = time.monotonic() - start
    assert info.value.code == "fetch_timeout" and "not complete within 4 s" in info.value.message
    assert 3.5 < elapsed < 6, elapsed


def test_connecting_nowhere_is_a_row_error():
    with StallingEndpoint() as endpoint:
        url = endpoint.url
    cfg = config(allowed_prefixes=["http://"], allow_private_addresses=True)
    with pytest.raises(RowError) as info:
        read_uri(url + "/x.png", cfg)  # the port is closed now
    assert info.value.code == "fetch_error" and "cannot connect" in info.value.message


# ---------------------------------------------------------------------------- local files


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = make_fifo(tmp_path)
    start = time.monotonic()
    with pytest.raises(RowError) as info:
        read_uri(str(fifo), config(allowed_prefixes=[str(tmp_path)]))
    assert info.value.code == "not_a_file" and "FIFO" in info.value.message
    assert time.monotonic() - start < 1


@pytest.mark.timeout(20)
def test_character_devices_are_refused():
    for uri in ("/dev/zero", "file:///dev/zero", "/dev/urandom"):
        with pytest.raises(RowError) as info:
            read_uri(uri, config(allowed_prefixes=["/dev"]))
        assert info.value.code == "not_a_file" and "character device" in info.value.message


def test_local_file_kinds(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(IMAGE)
    (images / "folder.png").mkdir()
    (tmp_path / "outside.png").write_bytes(IMAGE)
    os.symlink(tmp_path / "outside.png", images / "link-out.png")
    os.symlink(images / "a.png", images / "link-in.png")
    cfg = config(allowed_prefixes=[str(images)])
    assert read_uri(str(images / "a.png"), cfg) == IMAGE
    assert read_uri(str(images / "link-in.png"), cfg) == IMAGE
    assert read_uri(f"file://{images}/a%2Epng", cfg) == IMAGE  # file: URIs are percent-decoded
    assert code_of(read_uri, str(images / "link-out.png"), cfg) == "uri_not_allowed"
    assert code_of(read_uri, str(images / ".." / "outside.png"), cfg) == "uri_not_allowed"
    assert code_of(read_uri, str(images / "folder.png"), cfg) == "is_a_directory"
    assert code_of(read_uri, str(images / "missing.png"), cfg) == "not_found"
    assert code_of(read_uri, str(images / "a.png" / "x.png"), cfg) == "not_found"
    small = config(allowed_prefixes=[str(images)], max_bytes=len(IMAGE) - 1)
    assert code_of(read_uri, str(images / "a.png"), small) == "too_large"
    if os.geteuid() != 0:  # root reads anything
        locked = images / "locked.png"
        locked.write_bytes(IMAGE)
        locked.chmod(0)
        assert code_of(read_uri, str(locked), cfg) == "permission_denied"


def test_file_uri_forms_cannot_escape_through_the_working_directory(tmp_path, monkeypatch):
    """With the working directory inside the allowed folder, `file:/x` once meant "./file:/x" to the
    check and "/x" to the reader; now both read it as /x."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.png").write_bytes(IMAGE)
    (tmp_path / "out.png").write_bytes(IMAGE)
    monkeypatch.chdir(allowed)
    cfg = config(allowed_prefixes=[str(allowed)])
    for form in ("file:{}", "file://{}", "file:///{}", "file://localhost{}", "local:{}", "LOCAL://{}", "FILE:{}"):
        outside, inside = form.format(tmp_path / "out.png"), form.format(allowed / "in.png")
        assert code_of(check_uri, outside, cfg) == "uri_not_allowed", outside
        assert code_of(read_uri, outside, cfg) == "uri_not_allowed", outside
        assert read_uri(inside, cfg) == IMAGE, inside
    assert read_uri("in.png", cfg) == IMAGE  # a relative path is relative to the working directory


# ---------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from s3_server import CREDENTIALS, s3_server

    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with s3_server() as running:
            yield running
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def test_s3_reads_are_bounded_by_size(s3):
    s3.put("imgs/a.png", IMAGE)
    cfg = config(allowed_prefixes=[s3.url("imgs")], storage=s3.storage)
    assert read_uri(s3.url("imgs/a.png").replace("s3://", "S3://"), cfg) == IMAGE
    assert code_of(read_uri, s3.url("imgs/missing.png"), cfg) == "not_found"
    assert code_of(read_uri, s3.url("imgs/../imgs/a.png"), cfg) == "uri_not_allowed"
    small = config(allowed_prefixes=[s3.url("imgs")], storage=s3.storage, max_bytes=len(IMAGE) - 1)
    with pytest.raises(RowError) as info:
        read_uri(s3.url("imgs/a.png"), small)
    assert info.value.code == "too_large" and f"{len(IMAGE)} bytes" in info.value.message


@pytest.mark.slow  # 4 s: waits out its timeouts
def test_s3_timeouts_apply():
    """storage.timeout_s reaches the S3 client (each request gives up after 1 s and is retried on a new
    connection), and the total deadline (4 x 1 s) ends the row although s3fs and botocore would retry on."""
    with StallingEndpoint() as endpoint:
        storage = {"endpoint_url": endpoint.url, "anonymous": True, "region": "us-east-1", "timeout_s": 1.0}
        cfg = config(allowed_prefixes=["s3://"], storage=storage)
        start = time.monotonic()
        with pytest.raises(RowError) as info:
            read_uri("s3://bucket/a.png?versionId=secret", cfg)
        elapsed = time.monotonic() - start
        assert 3.5 < elapsed < 6, elapsed
        assert len(endpoint.connections) >= 2  # without the 1 s read timeout, the first request would hang
    assert info.value.code == "fetch_timeout"
    assert info.value.message.startswith("s3://bucket/a.png: not complete within 4 s")
