"""The Parquet sink: a failing write, kill -9 and an interrupted commit (what every format does: test_sink_contract.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

import vb_batch
from vb_batch.codecs import depth
from vb_batch.config import ConfigError, OutputConfig
from vb_batch.io.outputs import read_output
from vb_batch.io.sinks import ParquetSink


def make_input(path, n, start=0):
    rgb = depth.encode(np.linspace(1, 20, 16 * 16, dtype=np.float32).reshape(16, 16))
    image = png_bytes(rgb)
    pq.write_table(pa.table({"id": list(range(start, start + n)), "image": [image] * n}), path)


def config(tmp_path, mode="error", **output):
    return {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "mode": mode, "rows_per_file": 4, "commit_every": 8, **output},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": 3},
        "run": {"progress": False},
    }


def visible_files(tmp_path):
    return sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".parquet"))


def test_a_failing_write_stops_the_run_and_resume_completes_it(tmp_path, monkeypatch):
    """The local engine writes on its own thread: a storage failure there still stops the run, and what was
    written before it is committed; a resumed run gives each id once."""
    make_input(tmp_path / "in.parquet", 30)
    real_write = ParquetSink.write
    calls = {"n": 0}

    def flaky_write(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real_write(self, batch)

    monkeypatch.setattr(ParquetSink, "write", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        vb_batch.annotate(config(tmp_path))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    partial = read_output(str(tmp_path / "out")).column("id").to_pylist()
    assert 0 < len(partial) < 30 and len(set(partial)) == len(partial)
    monkeypatch.setattr(ParquetSink, "write", real_write)
    summary = vb_batch.annotate(config(tmp_path, "resume"))
    assert summary.success and summary.rows_skipped == len(partial)
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == list(range(30))


SLOW_JOB = """
import sys, time
import vb_batch
from vb_batch.models.identity import IdentityBackend

class Slow(IdentityBackend):
    def predict(self, images, prompts, task, seeds):
        time.sleep(0.05)
        return list(images)

vb_batch.annotate(sys.argv[1], backend=Slow(None))
"""


@pytest.mark.slow  # ~1.5 s: a child killed, then a resume
def test_kill_9_then_resume_gives_each_id_once(tmp_path):
    make_input(tmp_path / "in.parquet", 120)
    job = tmp_path / "job.yaml"
    cfg = config(tmp_path)
    cfg["output"].update(rows_per_file=6, commit_every=6)
    job.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_JOB, str(job)])
    commits = tmp_path / "out" / "_vb" / "commits"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(commits.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    before = read_output(str(tmp_path / "out")).num_rows
    assert 0 < before < 120
    summary = vb_batch.annotate(config(tmp_path, "resume"))
    assert summary.success and summary.rows_skipped >= before
    ids = read_output(str(tmp_path / "out")).column("id").to_pylist()
    assert sorted(ids) == list(range(120))
    assert not (tmp_path / "out" / "_vb" / "staging").exists()


def test_interrupted_commit_is_rolled_forward_and_foreign_files_are_never_touched(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64())])
    out = OutputConfig(path=str(tmp_path / "out"), rows_per_file=2, commit_every=0)
    sink = ParquetSink(out, "run1", schema)
    sink.open()
    sink.write(pa.record_batch([pa.array([1, 2, 3, 4])], schema=schema))  # two complete files, staged
    # Crash after the commit record was written but before the files moved into place.
    staged = list(sink._staged)
    record = {"run_id": "run1", "files": staged, "rows": 4, "time": 0}
    (tmp_path / "out" / "_vb" / "commits").mkdir(parents=True)
    (tmp_path / "out" / "_vb" / "commits" / "run1-00000.json").write_text(json.dumps(record))
    # And a part file vb_batch did not write (another dataset's, or a user's).
    pq.write_table(pa.table({"id": [99]}), tmp_path / "out" / "part-dead-00000.parquet")
    assert read_output(str(tmp_path / "out")).num_rows == 0  # the commit in flight is not visible yet

    resume = out.model_copy(update={"mode": "resume"})
    with pytest.raises(ConfigError, match="did not write.*part-dead-00000.parquet.*allow_foreign_files"):
        ParquetSink(resume, "run2", schema).open()
    resumed = ParquetSink(resume.model_copy(update={"allow_foreign_files": True}), "run2", schema)
    assert sorted(resumed.open().to_pylist()) == [1, 2, 3, 4]
    assert visible_files(tmp_path) == sorted([*staged, "part-dead-00000.parquet"])  # rolled forward, stray kept
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == [1, 2, 3, 4]
