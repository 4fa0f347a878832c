"""The local engine: the stages in one process, CPU work on threads overlapping the model.

    [reader thread] source -> rebatch to model.batch_size -> [io threads] fetch_decode
           -> [this thread] run_model (ModelBatcher: rows of one working size share calls across
              batches) -> [io threads] decode_encode -> [writer thread] sink, in input order

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
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from vb_batch.engines.base import (
    Engine,
    Run,
    cpu_count,
    part_report,
    read_ahead,
    rebatch,
)
from vb_batch.models.base import ModelBackend, create_backend
from vb_batch.stages import (
    ERROR_COLUMN,
    ModelBatcher,
    check_backend,
    decode_encode,
    fetch_decode,
)
from vb_batch.timing import run_collecting

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    """The stages in this process: reader, io and writer threads around one model thread."""

    name = "local"
    accepts_backend_instance = True

    @contextlib.contextmanager
    def session(self, run: Run, backend: ModelBackend | None) -> Iterator[ModelBackend]:
        if backend is None:
            loading = time.perf_counter()
            backend = create_backend(run.cfg.model)
            run.summary.model_load_seconds = time.perf_counter() - loading
        check_backend(run.plan, backend)
        yield backend

    def execute(self, run: Run, backend: ModelBackend) -> None:
        cfg, plan, summary = run.cfg, run.plan, run.summary
        io_threads = io_thread_count(cfg.engine.io_threads)
        with ThreadPoolExecutor(io_threads, thread_name_prefix="vb-io") as pool, ThreadPoolExecutor(
            1, thread_name_prefix="vb-write"
        ) as writer:
            decoded: deque[Future] = deque()
            written: deque[Future] = deque()  # one per batch; one writer thread keeps them in input order

            def write(finished: Future) -> None:
                out = finished.result()
                run.sink.write(out)
                run.apply(part_report(out.num_rows, out.column(ERROR_COLUMN)))

            def wait_for_writes(until: int) -> None:
                while len(written) > until:
                    written.popleft().result()  # a failed decode or write stops the run here

            clock = {"model": 0.0, "output": 0.0}  # the model thread's time in the model, and waiting for the writer
            batcher = ModelBatcher(plan, backend)

            def model_step(batch: pa.RecordBatch | None) -> None:
                t0 = time.perf_counter()
                answered = batcher.add(batch) if batch is not None else batcher.flush()
                t1 = time.perf_counter()
                for out in answered:
                    encoded = pool.submit(run_collecting, run.times, decode_encode, out, plan)
                    written.append(writer.submit(run_collecting, run.times, write, encoded))
                wait_for_writes(io_threads)
                clock["model"] += t1 - t0
                clock["output"] += time.perf_counter() - t1

            batches = read_ahead(
                rebatch(run.pending_batches(cfg.input.read_batch_rows), cfg.model.batch_size),
                depth=cfg.engine.prefetch_batches + 1,
            )
            loop_started = time.perf_counter()
            with contextlib.closing(batches):  # a failed step stops the reader thread too
                for batch in batches:
                    decoded.append(pool.submit(run_collecting, run.times, fetch_decode, batch, plan))
                    if len(decoded) > cfg.engine.prefetch_batches:
                        model_step(decoded.popleft().result())
            while decoded:
                model_step(decoded.popleft().result())
            model_step(None)
            # The rest of the model thread's loop was waiting for input: the next batch read, or decoded.
            loop_seconds = time.perf_counter() - loop_started
            wait_for_writes(0)
            summary.model_seconds = clock["model"]
            summary.model_output_wait_seconds = clock["output"]
            summary.model_input_wait_seconds = max(0.0, loop_seconds - clock["model"] - clock["output"])


def io_thread_count(configured: int | None) -> int:
    """`engine.io_threads`, or by default one per CPU but one left to the model thread, at most 4.

    More threads than cores slow a job down: on 2 cores the identity job took 1.5x as long with 4
    threads as with 1 (measured), the threads contending for the GIL and the cores.
    """
    if configured:
        return configured
    return min(4, max(1, cpu_count() - 1))
