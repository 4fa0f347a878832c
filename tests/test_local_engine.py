"""The local engine: CPU stages overlap the model, memory stays bounded, fsspec URLs work end to end."""

from __future__ import annotations

import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

import vb_batch
from vb_batch.codecs import depth
from vb_batch.io.outputs import read_output
from vb_batch.models.identity import IdentityBackend
from vb_batch.pipeline import loop, stream


class SlowBackend(IdentityBackend):
    def __init__(self, events):
        self.events = events

    def predict(self, images, prompts, task, seeds):
        self.events.append(("model_start", time.perf_counter()))
        time.sleep(0.05)
        self.events.append(("model_end", time.perf_counter()))
        return list(images)


def test_decode_overlaps_model_and_in_flight_batches_are_bounded(tmp_path, monkeypatch):
    image = png_bytes(depth.encode(np.full((16, 16), 3.0, np.float32)))
    pq.write_table(pa.table({"id": list(range(64)), "image": [image] * 64}), tmp_path / "in.parquet")
    events: list[tuple[str, float]] = []
    counts = {"decoded": 0, "written": 0, "max_ahead": 0}
    lock = threading.Lock()
    real_fetch, real_decode = loop.fetch_decode, loop.decode_encode

    def fetch(batch, plan):
        with lock:
            counts["decoded"] += 1
            counts["max_ahead"] = max(counts["max_ahead"], counts["decoded"] - counts["written"])
        started = time.perf_counter()
        time.sleep(0.01)  # a fetch long enough to be seen overlapping (a 16x16 PNG decodes in microseconds)
        out = real_fetch(batch, plan)
        events.append(("fetch", (started, time.perf_counter())))
        return out

    def finish(batch, plan):
        out = real_decode(batch, plan)
        with lock:
            counts["written"] += 1
        return out

    monkeypatch.setattr(loop, "fetch_decode", fetch)
    monkeypatch.setattr(loop, "decode_encode", finish)
    cfg = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")},
        "model": {"backend": "identity", "batch_size": 4},
        "engine": {"io_threads": 2, "prefetch_batches": 2},
        "run": {"progress": False},
    }
    summary = vb_batch.annotate(cfg, backend=SlowBackend(events))
    assert summary.rows_ok == 64
    # Some batch was fetched and decoded while the model was busy with another.
    starts = [t for k, t in events if k == "model_start"]
    spans = list(zip(starts, [t for k, t in events if k == "model_end"]))
    fetches = [span for k, span in events if k == "fetch"]
    assert sum(1 for s, e in spans for fs, fe in fetches if s < fe and fs < e) >= 4
    # Never more than prefetch + io_threads + the batch in the model (+1 being submitted) ahead of the sink.
    assert counts["max_ahead"] <= 2 + 2 + 2
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == list(range(64))


def test_fsspec_urls_in_and_out():
    fs = fsspec.filesystem("memory")
    image = png_bytes(depth.encode(np.linspace(1, 9, 64, dtype=np.float32).reshape(8, 8)))
    with fs.open("/bucket/in/images.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a", "b"], "image": [image, image]}), f)
    cfg = {
        "input": {"path": "memory://bucket/in/images.parquet", "min_side": 4},
        "output": {"path": "memory://bucket/out", "mode": "overwrite", "encoding": "array"},
        "model": {"backend": "identity"},
        "run": {"progress": False},
    }
    assert vb_batch.annotate(cfg).success
    assert fs.exists("/bucket/out/_SUCCESS")
    table = read_output("memory://bucket/out")
    assert sorted(table.column("id").to_pylist()) == ["a", "b"]
    d = vb_batch.load_arrays(table, "depth")[0]
    assert d.shape == (8, 8) and abs(float(d[0, 0]) - 1.0) < 0.01
    fs.rm("/bucket", recursive=True)


def test_read_ahead_keeps_order_raises_the_readers_error_and_stops_on_close():
    assert list(stream.read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield from (1, 2)
        raise OSError("object storage went away")

    got = []
    with pytest.raises(OSError, match="went away"):  # the items read before the error come first
        for item in stream.read_ahead(failing(), depth=2):
            got.append(item)  # noqa: PERF402 - the items must arrive before the error
    assert got == [1, 2]

    produced = []

    closed_on = []

    def endless():
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
        finally:  # e.g. an open file: closed where it was read
            closed_on.append(threading.current_thread().name)

    reader = stream.read_ahead(endless(), depth=2)
    assert next(reader) == 0
    reader.close()  # joins the reader thread: it stops instead of reading on
    assert not any(t.name == "vb-read" for t in threading.enumerate())
    assert len(produced) <= 5
    assert closed_on == ["vb-read"]


@pytest.mark.slow  # ~3 s
def test_the_model_thread_neither_reads_nor_decodes_and_the_summary_says_where_its_time_went(tmp_path, monkeypatch):
    image = png_bytes(depth.encode(np.full((16, 16), 3.0, np.float32)))
    pq.write_table(pa.table({"id": list(range(64)), "image": [image] * 64}), tmp_path / "in.parquet")
    readers: set[str] = set()
    real_rebatch, real_fetch = loop.rebatch, loop.fetch_decode

    def rebatch(batches, rows):
        for batch in real_rebatch(batches, rows):
            readers.add(threading.current_thread().name)
            yield batch

    monkeypatch.setattr(loop, "rebatch", rebatch)

    def run(name, fetch_seconds):
        def fetch(batch, plan):
            time.sleep(fetch_seconds)
            return real_fetch(batch, plan)

        monkeypatch.setattr(loop, "fetch_decode", fetch)
        cfg = {
            "input": {"path": str(tmp_path / "in.parquet"), "read_batch_rows": 4},
            "output": {"path": str(tmp_path / name)},
            "model": {"backend": "identity", "batch_size": 4},
            "engine": {"io_threads": 1, "prefetch_batches": 2},
            "run": {"progress": False},
        }
        summary = vb_batch.annotate(cfg, backend=SlowBackend([]))
        assert summary.rows_ok == 64
        waits = summary.model_input_wait_seconds + summary.model_output_wait_seconds
        assert 16 * 0.05 <= summary.model_seconds and summary.model_seconds + waits <= summary.seconds
        assert summary.model_load_seconds is None  # the backend was given, not loaded
        assert "model: " in summary.render() and "for input" in summary.render()
        return waits

    assert run("fed", 0.0) < 0.3
    assert readers == {"vb-read"}
    # Decoding slower than the model (0.1 s a batch against 0.05 s, on the one io thread that also encodes the
    # answers): the model thread waits ~16 x 0.05 s, for input or for the writer behind it.
    assert run("starved", 0.1) > 0.6
