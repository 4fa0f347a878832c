"""The one per-batch loop (`annotate_stream`): the stages' output in input order, the model overlapping the
rest, memory bounded whatever the input, every model second booked once, a failing step stopping every thread."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import png_bytes

from vb_batch.config import load_config
from vb_batch.models.identity import IdentityBackend
from vb_batch.pipeline import loop
from vb_batch.pipeline.inputs import fetch_decode
from vb_batch.pipeline.loop import ModelClock, annotate_batch, annotate_stream
from vb_batch.pipeline.model import run_model
from vb_batch.pipeline.outputs import decode_encode
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.timing import PhaseTimes

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("image", pa.binary())])
SIZES = [(6, 8), (8, 6), (7, 7)]
PNGS = [png_bytes(np.full((h, w, 3), 60 * k, np.uint8)) for k, (h, w) in enumerate(SIZES)]
LOOP_THREADS = ("vb-model", "vb-read", "vb-io")


def job(batch_size: int = 2, window: int | None = None) -> ResolvedJob:
    cfg = load_config({
        "input": {"path": "in.parquet", "min_side": 1},
        "tasks": ["depth"],
        "model": {"backend": "identity", "batch_size": batch_size, "group_window": window},
    })
    return ResolvedJob.build(cfg, SCHEMA, image_column="image", run_id="run-1")


def batches(sizes: list[list[int]], first_id: int = 0) -> list[pa.RecordBatch]:
    """One batch per list; each row a PNG of `SIZES[k]`, ids counting up from `first_id`."""
    out, ids = [], itertools.count(first_id)
    for row_sizes in sizes:
        cells = [PNGS[k] for k in row_sizes]
        out.append(pa.RecordBatch.from_arrays(
            [pa.array([next(ids) for _ in cells], pa.int64()), pa.array(cells, pa.binary())], schema=SCHEMA))
    return out


class Recording(IdentityBackend):
    """Identity answers after `seconds`, keyed by size when `keyed`; records each call's thread and span."""

    name = "recording"

    def __init__(self, cfg, seconds: float = 0.0, keyed: bool = False):
        super().__init__(cfg)
        self.seconds, self.keyed = seconds, keyed
        self.calls: list[tuple[str, float, float]] = []

    def batch_key(self, image):
        return image.shape[:2] if self.keyed else None

    def predict(self, images, prompts, task, seeds):
        started = time.perf_counter()
        time.sleep(self.seconds)
        self.calls.append((threading.current_thread().name, started, time.perf_counter()))
        return super().predict(images, prompts, task, seeds)


def loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(LOOP_THREADS)]


def test_the_output_is_the_stages_in_input_order_whatever_the_batching():
    """Batches of 3, 1 and 5 rows of mixed sizes, model calls of 2 grouped by size: as each batch through the stages."""
    plan = job(batch_size=2, window=4)
    given = batches([[0, 1, 2], [2], [1, 0, 0, 2, 1]])
    clock = ModelClock()
    out = [a.batch for a in annotate_stream(given, plan, Recording(plan.cfg.model, keyed=True), clock=clock)]
    expected = pa.Table.from_batches(
        [decode_encode(run_model(fetch_decode(b, plan), plan, Recording(plan.cfg.model)), plan) for b in given])
    assert pa.Table.from_batches(out).equals(expected)
    assert [b.num_rows for b in out] == [2, 2, 2, 2, 1]  # regrouped to model.batch_size
    assert clock.model_seconds > 0 and clock.input_wait_seconds >= 0 and clock.output_wait_seconds >= 0
    assert annotate_batch(given[2], plan, IdentityBackend(plan.cfg.model)).num_rows == 5
    empty = annotate_batch(given[0].slice(0, 0), plan, IdentityBackend(plan.cfg.model))
    assert empty.num_rows == 0 and empty.schema == plan.output_schema()
    assert loop_threads() == []


def test_the_model_runs_on_its_own_thread_while_the_caller_writes():
    plan = job(batch_size=2)
    backend = Recording(plan.cfg.model, seconds=0.03)
    writes = []
    for annotated in annotate_stream(batches([[0, 0]] * 8), plan, backend, io_threads=1):
        started = time.perf_counter()
        time.sleep(0.03)  # the caller's write
        writes.append((started, time.perf_counter()))
        assert annotated.batch.num_rows == 2
    assert {name for name, _, _ in backend.calls} == {"vb-model"}
    overlapping = sum(1 for _, s, e in backend.calls for ws, we in writes if s < we and ws < e)
    assert overlapping >= 3, (backend.calls, writes)


def test_memory_is_bounded_however_long_the_input():
    """An endless input and a caller that stops taking: the loop reads a bounded number of batches, then waits."""
    plan = job(batch_size=2)
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield batches([[0, 1]], first_id=2 * i)[0]

    stream = annotate_stream(endless(), plan, IdentityBackend(plan.cfg.model), io_threads=1, prefetch_batches=2)
    with contextlib.closing(stream):
        first = next(stream)
        time.sleep(0.5)  # the caller holds its batch: everything upstream fills and stops
        held = len(pulled)
        time.sleep(0.2)
        assert len(pulled) == held
        # Read ahead (prefetch + 1, and one being handed over), decoded (prefetch), one in the model,
        # finished (io_threads, and one being handed over), the caller's own.
        assert held <= (2 + 1 + 1) + 2 + 1 + (1 + 1) + 1
        assert first.batch.column(0).to_pylist() == [0, 1]
        assert next(stream).batch.column(0).to_pylist() == [2, 3]
    assert loop_threads() == []


def test_every_model_second_is_booked_once_with_a_later_batch():
    """The first row's size waits to the end: calls made meanwhile are booked with the next batch handed on."""
    plan = job(batch_size=2, window=100)
    backend = Recording(plan.cfg.model, seconds=0.01, keyed=True)
    clock = ModelClock()
    out = list(annotate_stream(batches([[2, 0], [0, 1], [1, 0], [0, 2]]), plan, backend, clock=clock))
    assert [a.batch.num_rows for a in out] == [2, 2, 2, 2]
    # All but the last, empty flush (nothing left to run): microseconds that no batch carries.
    assert sum(a.model_seconds for a in out) == pytest.approx(clock.model_seconds, abs=1e-3)
    assert sum(a.model_seconds for a in out) >= 0.01 * len(backend.calls)


def test_the_loop_books_its_threads_phases_into_the_callers_collector():
    plan = job(batch_size=2)
    times = PhaseTimes()
    list(annotate_stream(batches([[0, 1], [2, 2]]), plan, Recording(plan.cfg.model, seconds=0.02), times=times))
    phases = times.as_dict()
    assert phases["model"] >= 0.04 and phases["model_calls"] == 2 and phases["model_images"] == 4
    assert {"fetch_decode", "codec_decode", "encode"} <= set(phases)


def test_a_failing_reader_stage_or_write_stops_the_loop_and_joins_its_threads(monkeypatch):
    plan = job(batch_size=2)
    backend = IdentityBackend(plan.cfg.model)

    def failing_input():
        yield from batches([[0, 0], [1, 1]])
        raise OSError("object storage went away")

    with pytest.raises(OSError, match="went away"):
        list(annotate_stream(failing_input(), plan, backend))
    assert loop_threads() == []

    stream = annotate_stream(batches([[0, 0]] * 50), plan, backend)
    with pytest.raises(RuntimeError, match="disk full"), contextlib.closing(stream):
        for n, _ in enumerate(stream):
            if n == 2:
                raise RuntimeError("disk full")  # the caller's write
    assert loop_threads() == []

    def broken_stage(batch, plan):
        raise ValueError("a bug in a stage")

    monkeypatch.setattr(loop, "fetch_decode", broken_stage)
    with pytest.raises(ValueError, match="a bug in a stage"):
        list(annotate_stream(batches([[0, 0]] * 10), plan, backend))
    assert loop_threads() == []
