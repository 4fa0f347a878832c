"""Streams of batches in a worker process: the per-process model cache, rebatching, read-ahead.

    cached_backend:  the model for a job, built once per worker process and kept across tasks
    rebatch:         any batches -> batches of exactly `rows` rows (the last may be shorter)
    read_ahead:      an iterator produced on a background thread, a bounded number of items ahead

Every engine and integration uses these (through the per-batch loop,
`vb_batch.pipeline.loop`, or directly), so each process caches, regroups and
reads ahead the same way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from queue import Full, Queue
from typing import TypeVar

import pyarrow as pa

from vb_batch.models.base import ModelBackend, create_backend
from vb_batch.models.quota import attach
from vb_batch.pipeline.model import check_backend
from vb_batch.pipeline.resolved import ResolvedJob
from vb_batch.registry import replay
from vb_batch.timing import collecting, current

__all__ = ["cached_backend", "read_ahead", "rebatch"]

T = TypeVar("T")

_BACKENDS: dict[str, ModelBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def cached_backend(plan: ResolvedJob) -> ModelBackend:
    """The model for `plan`, built once per worker process and kept across tasks (Spark, Ray, helpers).

    Backends, profiles and presets that the driver registered at run time are
    registered here first, so a worker knows them too. A hosted model's requests
    are paced by the run's shared rate limiter when the engine started one
    (`plan.rate_limiter`), attached on every call: a backend kept from an earlier
    run paces by this run's.
    """
    attach(plan.cfg.model, plan.rate_limiter)
    key = plan.cfg.model.model_dump_json()
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            replay(plan.registrations)
            backend = create_backend(plan.cfg.model)
            check_backend(plan, backend)
            _BACKENDS[key] = backend
        return _BACKENDS[key]


def rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup batches into batches of exactly `rows` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if not batch.num_rows:
            continue
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


def read_ahead(items: Iterator[T], depth: int, name: str = "vb-read") -> Iterator[T]:
    """`items`, produced on a background thread (`name`) at most `depth` ahead of the consumer.

    The producer's exception is raised in the consumer, after the items before it.
    Closing the consumer early stops the producer after the item it is reading,
    closes `items` (a generator's `finally` runs, on the producer's thread) and
    joins the thread.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()
    end = object()
    times = current()  # the producer's phases count for the consumer's run

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        with contextlib.ExitStack() as scope:
            if times is not None:
                scope.enter_context(collecting(times))
            if hasattr(items, "close"):
                scope.callback(items.close)
            produce_items()

    def produce_items() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, exc))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
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
