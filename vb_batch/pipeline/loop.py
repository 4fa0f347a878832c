"""The one per-batch loop: batches of input rows in, annotated batches out, the model kept busy.

Every engine and integration that runs the stages over a stream of batches in
one process calls `annotate_stream` (the local engine, a Spark task, the Spark
DataFrame helper, the Ray Data `Annotator` through `annotate_batch`):

    [vb-read]   the caller's batches -> rebatch to model.batch_size   (at most prefetch + 1 ahead)
    [vb-io]     fetch_decode                                           (at most prefetch decoded waiting)
    [vb-model]  ModelBatcher: rows of one working size share calls across batches
    [vb-io]     decode_encode                                          (at most io_threads finished waiting)
    [caller]    the caller's write, on its own thread, in input order

The model thread only runs the model: reading, decoding, encoding and the
caller's writing happen on other threads, so a GPU is not left idle while a
Parquet file is read from object storage or compressed. Queues are bounded, so
memory holds a bounded number of batches whatever the input (a Spark task
never holds its unit's rows). Each yielded `Annotated` carries the model
seconds not booked with an earlier one (calls whose batches still waited for
rows of their size are booked with the next batch handed on); `ModelClock`
says how long the model thread worked, and waited for input and for the caller.

A step that raises (reading, a stage, the model, the caller's write) stops the
loop at once: the error is raised in the caller (after the batches the model
had handed on before it; batches still in flight are dropped, a resume redoes
them), and every thread the loop started is joined before it returns; model
calls still running on their own threads (a Batch API's jobs being polled) are
told to end (`ModelBatcher.close`). Faults of one row never raise: they stay in
that row's `vb_error`.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from vb_batch.models.base import ModelBackend
from vb_batch.pipeline.inputs import fetch_decode
from vb_batch.pipeline.model import ModelBatcher
from vb_batch.pipeline.outputs import decode_encode
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.pipeline.stream import read_ahead, rebatch
from vb_batch.timing import PhaseTimes, collecting, run_collecting

__all__ = ["Annotated", "ModelClock", "annotate_batch", "annotate_stream"]


@dataclass
class Annotated:
    """One batch out of the loop: its output rows (`ResolvedJob.output_schema()`), and model seconds to book."""

    batch: pa.RecordBatch
    model_seconds: float


@dataclass
class ModelClock:
    """Where the model thread's time went: in the model, waiting for decoded input, waiting for the caller."""

    model_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    output_wait_seconds: float = 0.0


def annotate_stream(
    batches: Iterable[pa.RecordBatch],
    plan: ResolvedJob,
    backend: ModelBackend,
    *,
    io_threads: int = 1,
    prefetch_batches: int = 2,
    times: PhaseTimes | None = None,
    clock: ModelClock | None = None,
) -> Iterator[Annotated]:
    """Run the stages over `batches` (any sizes), yielding annotated batches in input order.

    `io_threads` run fetch/decode and decode/encode; at most `prefetch_batches`
    decoded batches wait for the model, and at most `io_threads` finished ones
    wait for the caller (one more may be on its way). The loop's threads book
    their phases into `times`; the model thread's time goes to `clock`. Close
    the stream (or let it run out) to stop and join its threads.
    """
    clock = clock if clock is not None else ModelClock()
    pool = ThreadPoolExecutor(io_threads, thread_name_prefix="vb-io")
    modelled = read_ahead(_model_thread(batches, plan, backend, pool, prefetch_batches, times, clock),
                          depth=io_threads, name="vb-model")
    try:
        with contextlib.closing(modelled):  # a failed step, or a caller that stops, stops every thread
            for encoding, model_seconds in modelled:
                yield Annotated(encoding.result(), model_seconds)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _model_thread(
    batches: Iterable[pa.RecordBatch], plan: ResolvedJob, backend: ModelBackend, pool: ThreadPoolExecutor,
    prefetch_batches: int, times: PhaseTimes | None, clock: ModelClock,
) -> Iterator[tuple[Future, float]]:
    """What the model thread runs: (decode_encode's future, model seconds to book) per batch, in input order.

    Its time not in the model nor handed to the caller (across the `yield`, the
    wait for room in the caller's queue) went waiting for input.
    """
    batcher = ModelBatcher(plan, backend)
    unbooked = 0.0  # model seconds of calls not yet handed on with a finished batch
    started = time.perf_counter()

    def step(batch: pa.RecordBatch | None) -> Iterator[tuple[Future, float]]:
        nonlocal unbooked
        calls = time.perf_counter()
        answered = batcher.add(batch) if batch is not None else batcher.flush()
        seconds = time.perf_counter() - calls
        clock.model_seconds += seconds
        unbooked += seconds
        for out in answered:
            handing_on = time.perf_counter()
            yield pool.submit(run_collecting, times, decode_encode, out, plan), unbooked
            clock.output_wait_seconds += time.perf_counter() - handing_on
            unbooked = 0.0

    with collecting(times) if times is not None else contextlib.nullcontext():
        decoded: deque[Future] = deque()
        reader = read_ahead(rebatch(iter(batches), plan.cfg.model.batch_size), depth=prefetch_batches + 1)
        try:
            with contextlib.closing(reader):
                for batch in reader:
                    decoded.append(pool.submit(run_collecting, times, fetch_decode, batch, plan))
                    if len(decoded) > prefetch_batches:
                        yield from step(decoded.popleft().result())
            while decoded:
                yield from step(decoded.popleft().result())
            yield from step(None)
        finally:
            batcher.close()  # every way out (a failed step, a caller that stops): no model call runs on
            busy = clock.model_seconds + clock.output_wait_seconds
            clock.input_wait_seconds = max(0.0, time.perf_counter() - started - busy)


def annotate_batch(batch: pa.RecordBatch, plan: ResolvedJob, backend: ModelBackend) -> pa.RecordBatch:
    """All three stages on one batch, through the loop: its rows annotated, as one batch in input order."""
    outs = [annotated.batch for annotated in annotate_stream([batch], plan, backend)]
    if not outs:  # no rows in, none out: an empty batch of the output schema
        return pa.RecordBatch.from_pylist([], schema=plan.output_schema())
    return pa.Table.from_batches(outs).combine_chunks().to_batches()[0]
