"""Where a run's time goes: seconds per phase, collected per thread and summed per run.

Stages and engines wrap their work in `phase("resize")`; the seconds go to the
`PhaseTimes` that the calling thread is `collecting` into, if any (a stage called
outside a run costs one context-variable lookup). Engines give every worker thread,
Ray task and Spark task its own collector and add them up, so the run summary says
how many seconds (summed over workers) each phase took.

A phase entered inside another counts its own seconds only, never twice: a
sink's `write` that commits books the commit under "commit" and the rest under
"write". A phase's seconds are wall seconds of the thread that ran it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

# The phases a run reports, in pipeline order.
PHASES = (
    "read",  # source rows (Parquet pages, listings, lake scans)
    "fetch_decode",  # image bytes from URIs, image decoding and checks
    "model",  # the backend's predict (painting or values)
    "codec_decode",  # paintings -> depth / normals / classes
    "resize",  # maps back to the stored grid
    "encode",  # PNG or array encoding of the maps
    "write",  # part files
    "compact",  # merging short part files into files of output.rows_per_file rows (Ray, Spark)
    "commit",  # moving parts into the output, commit records, lake commits
    "report",  # the HTML report and previews
)

# Counts that travel with the phases (through the same collectors, part reports and Ray columns) and
# come out of them into the run summary: model calls, and the images they answered.
COUNTS = ("model_calls", "model_images")
# What hosted models' services billed (tokens, and US$ at the model's token prices): counted like COUNTS.
USAGE_COUNTS = ("usage_input_tokens", "usage_output_tokens", "usage_thought_tokens", "usage_cost")
COUNTS += USAGE_COUNTS

# This thread's collector and its stack of open phases (the seconds their inner phases took).
_collector: ContextVar[tuple[PhaseTimes, list[list[float]]] | None] = ContextVar("vb_batch_phase_times", default=None)


class PhaseTimes:
    """Seconds per phase (and the `COUNTS`); thread-safe so that several threads may add to one."""

    def __init__(self, seconds: Mapping[str, float] | None = None):
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        if seconds:
            self.merge(seconds)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def merge(self, other: PhaseTimes | Mapping[str, float] | None) -> None:
        if other is None:
            return
        for name, seconds in (other.as_dict() if isinstance(other, PhaseTimes) else other).items():
            self.add(name, float(seconds or 0.0))  # a phase that took no time still ran

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase in `PHASES` order (phases never entered are left out)."""
        with self._lock:
            known = [(name, self._seconds[name]) for name in PHASES if name in self._seconds]
            other = sorted((k, v) for k, v in self._seconds.items() if k not in PHASES)
        return {name: round(seconds, 6) for name, seconds in known + other}

    def total(self) -> float:
        with self._lock:
            return sum(self._seconds.values())


@contextmanager
def collecting(times: PhaseTimes) -> Iterator[PhaseTimes]:
    """Phases run by this thread (and code it calls) inside the block add to `times`."""
    token = _collector.set((times, []))
    try:
        yield times
    finally:
        _collector.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name` for the collector of this thread (nothing when there is none)."""
    state = _collector.get()
    if state is None:
        yield
        return
    times, open_phases = state
    inner = [0.0]
    open_phases.append(inner)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        open_phases.pop()
        times.add(name, elapsed - inner[0])
        if open_phases:
            open_phases[-1][0] += elapsed


def count(name: str, n: float = 1) -> None:
    """Add `n` to the count `name` (`COUNTS`) of this thread's collector, if any."""
    state = _collector.get()
    if state is not None:
        state[0].add(name, n)


def current() -> PhaseTimes | None:
    """The collector of this thread, if any (for code that hands work to other threads)."""
    state = _collector.get()
    return None if state is None else state[0]


def timed_items(items: Iterable[T], name: str) -> Iterator[T]:
    """`items`, each `next` timed as `name` (the consumer's time between items is not counted)."""
    iterator = iter(items)
    while True:
        with phase(name):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def run_collecting(times: PhaseTimes | None, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with this thread collecting into `times` (for work handed to a pool thread)."""
    if times is None:
        return fn(*args)
    with collecting(times):
        return fn(*args)
