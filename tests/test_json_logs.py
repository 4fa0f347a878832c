"""`--log-format json`: every line on stdout and stderr of a real `vb-batch` process is one JSON object.

Each run is a subprocess, as a scheduler or a log shipper sees it: local, Ray, Spark and a hosted
backend, with -v and -q; the progress events, the summary object and the failure object are read
back; lines other libraries write around logging (C++ on file descriptor 2, a child process, a
warning, a tqdm bar, a handler of their own) are caught. Text logs draw no bar off a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import png_bytes

from vb_batch.logs import json_line, line_level

TESTS = Path(__file__).resolve().parent
VB_BATCH = str(Path(sys.executable).with_name("vb-batch"))


def job(tmp_path: Path, rows: int = 6, **sections) -> Path:
    """A job over `rows` small images and one row that is not an image (a failed row)."""
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(rows)] + [b"junk"]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows + 1)], "image": images}), tmp_path / "in.parquet")
    config = {"input": {"path": "in.parquet"}, "output": {"path": "out", "report": False},
              "model": {"backend": "identity", "batch_size": 2}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def vb_batch(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, list[dict], list[dict]]:
    """Run `vb-batch ARGS --log-format json`; (exit code, stdout objects, stderr objects): every line must parse."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    done = subprocess.run([VB_BATCH, *args, "--log-format", "json"], capture_output=True, text=True, env=environ,
                          timeout=timeout)
    streams = []
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        objects = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                pytest.fail(f"a line on {name} is not JSON: {line!r}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
            assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= entry.keys(), line
            objects.append(entry)
        streams.append(objects)
    return done.returncode, streams[0], streams[1]


def the_summary(out: list[dict]) -> dict:
    [summary] = [e for e in out if e.get("event") == "summary"]
    return summary


@pytest.mark.slow  # a vb-batch process: ~1 s to start, more on busy cores
def test_local_with_v_logs_progress_events_and_one_summary_object(tmp_path):
    config = job(tmp_path, rows=12, model={"backend": "job_backends:SlowBackend", "batch_size": 1,
                                                  "options": {"delay_s": 0.03}})
    code, out, err = vb_batch("run", str(config), "-v", "--progress-every", "0.05")
    assert code == 0, err
    summary = the_summary(out)
    assert out == [summary]  # stdout holds the summary, nothing else
    assert summary["exit_code"] == 0 and summary["success"] is True
    assert (summary["rows_read"], summary["rows_ok"], summary["rows_failed"]) == (13, 12, 1)
    assert summary["errors_by_code"] == {"not_image": 1} and summary["engine"] == "local"
    assert summary["output"] == str(tmp_path / "out") and summary["seconds"] > 0 and summary["wall_seconds"]
    assert any(e["level"] == "INFO" and e["logger"].startswith("vb_batch.") and "event" not in e for e in err)
    progress = [e for e in err if e.get("event") == "progress"]
    assert len(progress) >= 3, progress  # periodic while the run works, and one at its end
    assert all(e["run_id"] == summary["run_id"] and e["rows_total"] == 13 for e in progress)
    assert progress[-1]["rows_done"] == 13 and progress[-1]["rows_failed"] == 1
    assert [e["rows_done"] for e in progress] == sorted(e["rows_done"] for e in progress)
    assert not [e for e in err if e["logger"] in ("stdout", "stderr")]  # nothing needed catching
    pointer = json.loads((tmp_path / "out" / "_vb" / "latest-run.json").read_text())
    assert pointer["run_id"] == summary["run_id"]


@pytest.mark.slow  # a vb-batch process: ~1 s to start, more on busy cores
def test_q_keeps_the_summary_and_errors_only(tmp_path):
    config = job(tmp_path)
    code, out, err = vb_batch("-q", "run", str(config), "run.max_error_fraction=0.05")
    assert code == 1  # 1 of 7 rows failed: over the budget
    summary = the_summary(out)
    assert summary["success"] is False and summary["exit_code"] == 1 and summary["level"] == "ERROR"
    assert "max_error_fraction" in summary["detail"] and summary["rows_failed"] == 1
    assert all(e["level"] in ("ERROR", "CRITICAL") for e in err), err
    assert not [e for e in err if e.get("event") == "progress"]


@pytest.mark.slow  # a vb-batch process: ~1 s to start, more on busy cores
def test_lines_written_around_logging_are_caught(tmp_path):
    config = job(tmp_path, rows=2, model={"backend": "job_backends:NoisyBackend", "batch_size": 4})
    code, out, err = vb_batch("run", str(config))
    assert code == 0
    caught = {e["message"]: (e["logger"], e["level"]) for e in out + err}
    assert caught["[2026-12-07 11:45:43,845 E 7640 7640] core_worker.cc:2465: a C++ line"] == ("stderr", "ERROR")
    assert caught["WARNING: a line from the JVM itself"] == ("stderr", "WARNING")
    assert caught["child on stdout"] == ("stdout", "INFO") and caught["child on stderr"] == ("stderr", "WARNING")
    assert caught["a print to stdout"] == ("stdout", "INFO")
    # Its handler was made before the run started: it got the JSON formatter, so its level and name are kept.
    assert caught["a library's own handler"] == ("noisy_library", "ERROR")
    warned = [e for e in err if e["logger"] == "py.warnings"]
    assert warned and "a Python warning from a library" in warned[0]["message"]
    assert not [e for e in out + err if "a library's bar" in e["message"]]  # tqdm is off (TQDM_DISABLE)
    assert the_summary(out)["rows_ok"] == 2


@pytest.mark.slow  # a vb-batch process: ~1 s to start, more on busy cores
def test_failures_and_usage_errors_are_one_object(tmp_path):
    config = job(tmp_path)
    code, out, err = vb_batch("run", str(config), "model.batch_size=0")
    assert code == 2 and out == []
    [failure] = err
    assert failure["event"] == "failure" and failure["exit_code"] == 2 and failure["level"] == "ERROR"
    assert "model.batch_size" in failure["message"]
    code, out, err = vb_batch("run")  # no config: argparse's usage error
    assert code == 2 and out == [] and err[-1]["event"] == "failure" and "config" in err[-1]["message"]


@pytest.mark.slow  # a vb-batch process: ~1 s to start, more on busy cores
def test_text_logs_draw_no_bar_off_a_terminal(tmp_path):
    config = job(tmp_path)
    done = subprocess.run([VB_BATCH, "run", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stderr == ""  # no bar: stderr is a pipe
    assert done.stdout.startswith("vb-batch run ") and "rows: 6 ok, 1 failed" in done.stdout


@pytest.mark.parametrize(("line", "level"), [
    ("2026-12-07 11:45:41,222\tWARNING authentication_token_setup.py:85 -- Token authentication", "WARNING"),
    ("(MapWorker(MapBatches(prepare)) pid=812) 2026-12-07 11:45:41,222\tERROR x.py:1 -- boom", "ERROR"),
    ("26/12/07 11:46:47 WARN Utils: Your hostname resolves to a loopback address", "WARNING"),
    ("[2026-12-07 11:45:43,845 I 7640 7640] core_worker.cc:1: started", "INFO"),
    ("WARNING: Using incubator modules: jdk.incubator.vector", "WARNING"),
    ("Traceback (most recent call last):", None),
])
def test_the_level_of_a_foreign_line(line, level):
    assert line_level(line) == level


def test_json_line_passes_objects_wraps_text_and_drops_below_the_level():
    assert json_line('{"a": 1}\n', "stdout") == '{"a": 1}'
    assert json.loads(json_line("[1, 2]", "stdout"))["message"] == "[1, 2]"  # JSON, but not an object
    wrapped = json.loads(json_line("bar 10%\rbar 50%\rbar 100%\r\n", "stderr"))
    assert wrapped["message"] == "bar 100%" and wrapped["level"] == "WARNING" and wrapped["logger"] == "stderr"
    assert json_line("  \n", "stdout") is None
    info = "2026-12-07 11:45:43,369\tINFO worker.py:2038 -- Started a local Ray instance."
    assert json_line(info, "stderr", logging.WARNING) is None
    assert json.loads(json_line(info, "stderr", logging.INFO))["level"] == "INFO"


@pytest.mark.slow
def test_a_hosted_backend_run_with_its_estimate(tmp_path):
    from hosted_servers import OpenAIServer

    with OpenAIServer("sk-json-logs-test") as server:
        model = {"backend": "openai", "model_name": "gpt-image-test", "token_env": "OPENAI_JSON_KEY",
                 "endpoint": server.url + "/v1", "profile": "vision-banana", "retry_backoff_s": 0.01,
                 "batch_size": 2, "price_per_image": 0.04}
        config = job(tmp_path, rows=3, tasks=["depth"], model=model)
        code, out, err = vb_batch("run", str(config), "-v", env={"OPENAI_JSON_KEY": "sk-json-logs-test"})
    assert code == 0, err
    summary = the_summary(out)
    assert summary["rows_ok"] == 3 and summary["estimate"]["requests"] == 4  # priced before the junk row fails
    [estimate] = [e for e in err if e.get("event") == "estimate"]
    assert estimate["estimate"]["total"] == pytest.approx(0.04 * summary["estimate"]["requests"])
    assert "sk-json-logs-test" not in json.dumps(out + err)
    assert [e for e in err if e.get("event") == "progress"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_ray_and_spark_runs(tmp_path, engine):
    config = job(tmp_path, rows=4, engine={"kind": engine})
    code, out, err = vb_batch("run", str(config), "-v", timeout=300)
    assert code == 0, err
    summary = the_summary(out)
    assert summary["engine"] == engine and (summary["rows_ok"], summary["rows_failed"]) == (4, 1)
    assert [e for e in err if e.get("event") == "progress"][-1]["rows_done"] == 5
    if engine == "spark":  # the driver JVM logs through log4j2-json.properties, not caught as raw lines
        assert not [e for e in err if e["logger"] == "stderr" and " WARN " in e["message"]]
