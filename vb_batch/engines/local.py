"""The local engine: the stages in one process, CPU work on threads overlapping the model.

    [reader thread] source -> rebatch to model.batch_size -> [io threads] fetch_decode
           -> [this thread] run_model -> [io threads] decode_encode -> [writer thread] sink, in input order

The model thread only runs the model: reading, decoding, encoding and writing
happen on other threads, so a GPU is not left idle while a Parquet file is read
from object storage or compressed. At most `prefetch_batches` decoded batches
wait for the model and at most `io_threads` finished batches wait for the
writer, so memory stays bounded however large the input. The summary says how
long the model thread worked and how long it waited, for input and for the writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Full, Queue
from typing import TypeVar

import pyarrow as pa

from vb_batch.config import JobConfig, redacted
from vb_batch.io.sinks import open_sink
from vb_batch.io.sources import Source, open_source
from vb_batch.job import RunSummary, tracked_run
from vb_batch.models.base import ModelBackend, create_backend
from vb_batch.stages import ERROR_COLUMN, Plan, check_backend, decode_encode, fetch_decode, run_model

log = logging.getLogger(__name__)

T = TypeVar("T")


def rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup batches into batches of exactly `rows` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, rows).to_batches()[0]
            rest = table.slice(rows)
            pending = rest.to_batches() if rest.num_rows else []
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items`, produced on a background thread at most `depth` ahead of the consumer.

    The producer's exception is raised in the consumer, after the items before it.
    Closing the consumer early stops the producer after the item it is reading.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, exc))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="vb-read", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = queue.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def pending_rows(
    source: Source, batch_rows: int, done: set, summary: RunSummary, advance: Callable[[int], None]
) -> Iterator[pa.RecordBatch]:
    """The source's rows minus those already committed (resume)."""
    for batch in source.batches(batch_rows):
        summary.rows_read += batch.num_rows
        if done:
            ids = batch.column(batch.schema.get_field_index(source.id_column)).to_pylist()
            batch = batch.filter(pa.array([i not in done for i in ids]))
            skipped = len(ids) - batch.num_rows
            summary.rows_skipped += skipped
            advance(skipped)
        if batch.num_rows:
            yield batch


def run_local(cfg: JobConfig, backend: ModelBackend | None = None) -> RunSummary:
    started = time.perf_counter()
    source = open_source(cfg.input)
    plan = Plan.build(cfg, source.schema, image_column=source.image_column, uri_column=source.uri_column)
    sink = open_sink(cfg.output, plan.run_id, plan.output_schema(), source.id_column)
    summary = RunSummary(run_id=plan.run_id, output=cfg.output.name, engine="local")
    sink.check_mode()  # fail fast, before a large model is loaded
    if backend is None:
        loading = time.perf_counter()
        backend = create_backend(cfg.model)
        summary.model_load_seconds = time.perf_counter() - loading
    check_backend(plan, backend)
    done = sink.open()
    log.info("run %s: %s", plan.run_id, redacted(cfg))

    io_threads = io_thread_count(cfg.engine.io_threads)
    with tracked_run(cfg, sink, summary, started, source.count_rows()) as advance, ThreadPoolExecutor(
        io_threads, thread_name_prefix="vb-io"
    ) as pool, ThreadPoolExecutor(1, thread_name_prefix="vb-write") as writer:
        progress_lock = threading.Lock()
        decoded: deque[Future] = deque()
        written: deque[Future] = deque()  # one per batch; one writer thread keeps them in input order

        def progress(rows: int) -> None:
            with progress_lock:
                advance(rows)

        def write(finished: Future) -> None:
            out = finished.result()
            sink.write(out)
            summary.count_errors([e and e["code"] for e in out.column(ERROR_COLUMN).to_pylist()])
            progress(out.num_rows)

        def wait_for_writes(until: int) -> None:
            while len(written) > until:
                written.popleft().result()  # a failed decode or write stops the run here

        clock = {"model": 0.0, "output": 0.0}  # the model thread's time in the model, and waiting for the writer

        def model_step() -> None:
            batch = decoded.popleft().result()
            t0 = time.perf_counter()
            answered = run_model(batch, plan, backend)
            t1 = time.perf_counter()
            written.append(writer.submit(write, pool.submit(decode_encode, answered, plan)))
            wait_for_writes(io_threads)
            clock["model"] += t1 - t0
            clock["output"] += time.perf_counter() - t1

        batches = read_ahead(
            rebatch(pending_rows(source, cfg.input.read_batch_rows, done, summary, progress), cfg.model.batch_size),
            depth=cfg.engine.prefetch_batches + 1,
        )
        loop_started = time.perf_counter()
        with contextlib.closing(batches):  # a failed step stops the reader thread too
            for batch in batches:
                decoded.append(pool.submit(fetch_decode, batch, plan))
                if len(decoded) > cfg.engine.prefetch_batches:
                    model_step()
        while decoded:
            model_step()
        # The rest of the model thread's loop was waiting for input: the next batch read, or decoded.
        loop_seconds = time.perf_counter() - loop_started
        wait_for_writes(0)
        summary.model_seconds = clock["model"]
        summary.model_output_wait_seconds = clock["output"]
        summary.model_input_wait_seconds = max(0.0, loop_seconds - clock["model"] - clock["output"])
    return summary


def io_thread_count(configured: int | None) -> int:
    """`engine.io_threads`, or by default one per CPU but one left to the model thread, at most 4.

    More threads than cores slow a job down: on 2 cores the identity job took 1.5x as long with 4
    threads as with 1 (measured), the threads contending for the GIL and the cores.
    """
    if configured:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, max(1, cpus - 1))
