"""Secrets never leave memory: a marker in every secret-bearing field, searched for everywhere a run leaves text.

A real run (`vb-batch run`, local engine) against a loopback painter that echoes the token,
a header value and the endpoint's key back in its reason phrase and its error body; then every
file under the output (raw bytes, and the decoded rows and metadata of every Parquet file), the
report, stdout, stderr and every log record are searched for every marker.
"""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backend_http import painter  # noqa: F401 - the loopback painter fixture

from vb_batch.cli import main
from vb_batch.config import load_config, redacted
from vb_batch.io.outputs import read_output
from vb_batch.masking import mask_url, scrub
from vb_batch.models.base import model_id, public_url

QUERY_KEY = "mk-query-3a9f1c"
HEADER_VALUE = "mk-header-77b0e2"
TOKEN = "mk-token-5e8d41"
STORAGE_KEY = "mk-storekey-c41a"
STORAGE_SECRET = "mk-storesecret-0be7"
ENDPOINT_USER, ENDPOINT_PASSWORD, ENDPOINT_QUERY = "mk-epuser-19aa", "mk-eppass-6f3d", "mk-epquery-d2c8"
CATALOG_PASSWORD = "mk-catalog-a07e"
MARKERS = [QUERY_KEY, HEADER_VALUE, TOKEN, STORAGE_KEY, STORAGE_SECRET, ENDPOINT_USER, ENDPOINT_PASSWORD,
           ENDPOINT_QUERY, CATALOG_PASSWORD]


def leaks(text: str) -> list[str]:
    return [m for m in MARKERS if m in text]


def output_text(root) -> str:
    """Everything under `root`: raw bytes of every file, and the decoded rows and metadata of Parquet files."""
    texts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        texts.append(path.read_bytes().decode("latin-1"))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            texts += [str(table.to_pylist()), str(table.schema.metadata)]
            texts += [str(f.metadata) for f in table.schema]
    return "\n".join(texts)


@pytest.fixture
def job_file(painted_table, painter, tmp_path, monkeypatch):  # noqa: F811 - the fixture imported above
    """A job config with a marker in every secret-bearing field it accepts; the painter echoes them back."""
    paths, _ = painted_table
    monkeypatch.setenv("PAINTER_TOKEN", TOKEN)
    echo = f"token {TOKEN} team {HEADER_VALUE} key={QUERY_KEY}"
    painter.script = [503, 400]  # a retried call (its words go to a log line), then a row error
    painter.reason = f"Refused {echo}"
    painter.error_body = json.dumps({"error": {"message": echo, "hint": f"Bearer {TOKEN}"}}).encode()
    config = {
        "input": {"path": str(paths["depth"]), "storage": {
            "endpoint_url": "http://127.0.0.1:9", "options": {"key": STORAGE_KEY, "secret": STORAGE_SECRET},
        }},
        "output": {"path": str(tmp_path / "out"), "compression": "none", "encoding": "png"},
        "tasks": ["depth"],
        "model": {"backend": "http", "endpoint": f"{painter.url}&key={QUERY_KEY}", "headers": {"X-Team": HEADER_VALUE},
                  "token_env": "PAINTER_TOKEN", "max_retries": 1, "retry_backoff_s": 0.01, "batch_size": 2},
        "run": {"progress": False, "max_error_fraction": 1.0},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_no_marker_leaves_memory_in_a_real_run(job_file, painter, tmp_path, capfd, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "validate", str(job_file)]) == 0
    shown = capfd.readouterr()
    resolved = json.loads(shown.out)
    # The masks are in place where the secrets were: the config is shown, not emptied.
    assert resolved["model"]["endpoint"] == f"{public_url(painter.url)}?***"
    assert resolved["model"]["headers"] == {"X-Team": "***"}
    assert resolved["input"]["storage"]["options"] == {"key": "***", "secret": "***"}

    assert main(["-v", "run", str(job_file)]) == 0
    ran = capfd.readouterr()
    # The secrets were really in play: sent to the server, echoed back, and its words recorded.
    headers, _ = painter.requests[0]
    assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["X-Team"] == HEADER_VALUE
    assert painter.paths[0].endswith(QUERY_KEY)
    out = tmp_path / "out"
    errors = [e for e in read_output(str(out)).column("vb_error").to_pylist() if e]
    assert errors and all("HTTP 400 Refused token *** team *** key=***" in e["message"] for e in errors)
    assert "HTTP 503 Refused token ***" in caplog.text
    assert (out / "_report.html").exists() and list((out / "_vb" / "runs").glob("*.json"))

    everything = {
        "validate stdout": shown.out, "validate stderr": shown.err, "run stdout": ran.out, "run stderr": ran.err,
        "logs": "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records), "output files": output_text(out),
    }
    for where, text in everything.items():
        assert not leaks(text), where


@pytest.mark.parametrize(
    "section, value, field",
    [
        ("storage", {"endpoint_url": f"https://{ENDPOINT_USER}:{ENDPOINT_PASSWORD}@s3.example.com"}, "storage.endpoint_url"),
        ("storage", {"endpoint_url": f"https://s3.example.com/?sig={ENDPOINT_QUERY}"}, "storage.endpoint_url"),
        ("catalog", {"name": "c", "uri": f"postgresql://vb:{CATALOG_PASSWORD}@db/cat"}, "catalog.uri"),
    ],
)
def test_credentials_in_urls_are_refused_without_being_echoed(tmp_path, capfd, section, value, field):
    config = {"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out")}}
    if section == "catalog":
        config["output"] = {"format": "iceberg", "table": "ns.t", "catalog": value}
    else:
        config["output"]["storage"] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        shown = capfd.readouterr()
        assert f"output.{field}" in shown.err and not leaks(shown.out + shown.err)
    assert not (tmp_path / "out").exists()


def test_validate_masks_the_url_in_what_the_storage_layer_says(tmp_path, capfd):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": {"path": f"http://127.0.0.1:9/in.parquet?sig={ENDPOINT_QUERY}"},
                                   "output": {"path": "out"}, "model": {"backend": "identity"}}))
    assert main(["validate", "--live", str(path)]) == 2
    err = capfd.readouterr().err
    assert "input.path: 'http://127.0.0.1:9/in.parquet?***'" in err and not leaks(err)


def test_redacted_masks_every_url_valued_field_and_header():
    cfg = load_config({
        "input": {"path": f"https://images.example.com/set?sig={ENDPOINT_QUERY}", "uri_column": "uri",
                  "allowed_prefixes": [f"https://cdn.example.com/a?token={QUERY_KEY}"]},
        "output": {"format": "iceberg", "table": "ns.t",
                   "catalog": {"name": "c", "uri": f"sqlite:////tmp/c.db?password={CATALOG_PASSWORD}"}},
        "model": {"backend": "http", "endpoint": f"https://painter.example.com/v1?key={QUERY_KEY}#{TOKEN}",
                  "headers": {"X-Team": HEADER_VALUE}, "options": {"api_key": TOKEN}},
        "engine": {"kind": "ray", "address": f"ray://head:10001?auth={TOKEN}"},
    })
    shown = json.dumps(redacted(cfg))
    assert not leaks(shown)
    assert "https://painter.example.com/v1?***#***" in shown and "sqlite:////tmp/c.db?***" in shown
    assert model_id(cfg.model) == "http:https://painter.example.com/v1"


URL_SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~", min_size=4, max_size=24)


@settings(max_examples=300, deadline=None)
@given(secret=URL_SAFE, header=st.text(st.characters(max_codepoint=255, blacklist_categories=("Cc",)), min_size=1, max_size=24))
def test_no_secret_survives_redaction_whatever_it_spells(secret, header):
    secret = "Zq9" + secret  # a value no other part of the config could spell by chance
    cfg = load_config({
        "input": {"path": "in/", "storage": {"options": {"secret": secret}}},
        "model": {"backend": "http", "endpoint": f"https://h.example/p?x=1&key={secret}", "headers": {"X-A": "Zq9" + header}},
    })
    shown = json.dumps(redacted(cfg), ensure_ascii=False)
    assert secret not in shown and "Zq9" + header not in shown
    assert secret not in model_id(cfg.model)
    assert secret not in mask_url(f"https://{secret}:{secret}@h.example/p?{secret}#{secret}")


# Text around the echo is drawn from characters no form of the secret holds, so that only the
# echo itself could spell the secret in what comes out.
AROUND = " \t:,;!"


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(st.characters(blacklist_characters="*%" + AROUND, blacklist_categories=("Cs",)), min_size=3, max_size=20),
    before=st.text(AROUND, max_size=10), after=st.text(AROUND, max_size=10),
)
def test_scrub_masks_a_secret_however_a_server_echoes_it(secret, before, after):
    from urllib.parse import quote, quote_plus

    for form in (secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]):
        text = scrub(before + form + after, {secret})
        assert text == before + "***" + after


HOSTED_KEY = "mk-hostedkey-8c2e"


@pytest.mark.parametrize("backend, mode", [("gemini", "online"), ("gemini", "batch"), ("openai", "online")])
def test_a_hosted_key_never_leaves_memory(painted_table, tmp_path, monkeypatch, capfd, caplog, backend, mode):
    """The servers echo the key in retried errors and in row errors; nothing a run leaves holds it."""
    from hosted_servers import GeminiServer, OpenAIServer, _json, google_error, image_response

    paths, _ = painted_table
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HOSTED_KEY", HOSTED_KEY)
    echo = f"quota for key {HOSTED_KEY} (x-goog-api-key: {HOSTED_KEY}; Bearer {HOSTED_KEY})"
    server = GeminiServer(HOSTED_KEY) if backend == "gemini" else OpenAIServer(HOSTED_KEY)
    if backend == "gemini":
        server.script = [google_error(503, "UNAVAILABLE", echo), google_error(400, "INVALID_ARGUMENT", echo)]
        calls = iter(range(10**6))
        server.paint = lambda image, prompt, request: ("error", 500, echo) if next(calls) == 0 else image_response(image)
    else:
        error = {"error": {"message": echo, "type": "invalid_request_error", "code": "bad"}}
        server.script = [_json(503, error), _json(400, error)]
    with server:
        config = {
            "input": {"path": str(paths["depth"])},
            "output": {"path": str(tmp_path / "out"), "compression": "none", "encoding": "png"},
            "tasks": ["depth"],
            "model": {"backend": backend, "model_name": "m-1", "token_env": "HOSTED_KEY",
                      "endpoint": server.url + ("/v1" if backend == "openai" else ""), "max_retries": 1,
                      "retry_backoff_s": 0.01, "batch_size": 2,
                      # gemini's own keys: the openai backend takes neither (a misplaced key is refused)
                      **({"mode": mode, "batch_poll_s": 0.01} if backend == "gemini" else {})},
            "run": {"progress": False, "max_error_fraction": 1.0},
        }
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["-v", "run", str(path)]) == 0
    ran = capfd.readouterr()
    out = tmp_path / "out"
    errors = [e for e in read_output(str(out)).column("vb_error").to_pylist() if e]
    assert errors and any("quota for key ***" in e["message"] for e in errors)  # the server's words, masked
    if mode == "batch":
        assert list((out / "_vb" / "hosted").glob("gemini-*.json"))
    else:
        assert "quota for key ***" in caplog.text  # the retried 503's log line
    everything = {"run stdout": ran.out, "run stderr": ran.err, "output files": output_text(out),
                  "logs": "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)}
    for where, text in everything.items():
        assert HOSTED_KEY not in text, where
