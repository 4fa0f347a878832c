"""The local engine: the stages in one process, CPU work on threads overlapping the model.

    [reader thread] source -> rebatch to model.batch_size -> [io threads] fetch_decode
           -> [model thread] ModelBatcher (rows of one working size share calls across batches)
           -> [io threads] decode_encode -> [this thread] sink, in input order

The loop is the one every engine shares (`vb_batch.pipeline.loop.annotate_stream`):
the model thread only runs the model, so a GPU is not left idle while a Parquet
file is read from object storage or compressed; at most `prefetch_batches`
decoded batches wait for the model and at most `io_threads` finished batches
wait for the sink, so memory stays bounded however large the input. The
summary says how long the model thread worked and how long it waited, for
input and for the sink.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from vb_batch.engines.core import Engine, Run
from vb_batch.errors import ERROR_COLUMN, cpu_count
from vb_batch.io.sinks.staging import part_report
from vb_batch.models.base import ModelBackend, create_backend
from vb_batch.pipeline.loop import ModelClock, annotate_stream
from vb_batch.pipeline.model import check_backend

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    """The stages in this process: reader, io and model threads around the sink's writes on this one."""

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
        cfg, summary = run.cfg, run.summary
        clock = ModelClock()
        stream = annotate_stream(
            run.pending_batches(cfg.input.read_batch_rows), run.plan, backend,
            io_threads=io_thread_count(cfg.engine.io_threads), prefetch_batches=cfg.engine.prefetch_batches,
            times=run.times, clock=clock,
        )
        with contextlib.closing(stream):  # a failed write stops the loop's threads too
            for annotated in stream:
                out = annotated.batch
                run.sink.write(out)
                run.apply(part_report(out.num_rows, out.column(ERROR_COLUMN)))
        summary.model_seconds = clock.model_seconds
        summary.model_output_wait_seconds = clock.output_wait_seconds
        summary.model_input_wait_seconds = clock.input_wait_seconds


def io_thread_count(configured: int | None) -> int:
    """`engine.io_threads`, or by default one per CPU but one left to the model thread, at most 4.

    More threads than cores slow a job down: on 2 cores the identity job took 1.5x as long with 4
    threads as with 1 (measured), the threads contending for the GIL and the cores.
    """
    if configured:
        return configured
    return min(4, max(1, cpu_count() - 1))
