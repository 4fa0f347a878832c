"""Where a run's time goes: seconds per phase, collected per thread and summed per run.

Stages and engines wrap their work in `phase("resize")`; the seconds go to the
`PhaseTimes` that the calling thread is `collecting` into, if any (a stage called
outside a run costs one context-variable lookup). Engines give every worker thread,
Ray task and Spark task its own collector and add them up, so the run summary says
how many seconds (summed over workers) each phase took.

Phases do not nest: a phase's seconds are wall seconds of the thread that ran it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

# The phases a run reports, in pipeline order.
PHASES = (
    "read",  # source rows (Parquet pages, listings, lake scans)
    "fetch_decode",  # image bytes from URIs, image decoding and checks
    "model",  # the backend's predict (painting or values)
    "codec_decode",  # paintings -> depth / normals / classes
    "resize",  # maps back to the stored grid
    "encode",  # PNG or array encoding of the maps
    "write",  # part files
    "commit",  # moving parts into the output, commit records, lake commits
    "report",  # the HTML report and previews
)

_collector: ContextVar["PhaseTimes | None"] = ContextVar("vb_batch_phase_times", default=None)


class PhaseTimes:
    """Seconds per phase; thread-safe so that several threads may add to one."""

    def __init__(self, seconds: Mapping[str, float] | None = None):
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        if seconds:
            self.merge(seconds)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def merge(self, other: "PhaseTimes | Mapping[str, float] | None") -> None:
        if other is None:
            return
        for name, seconds in (other.as_dict() if isinstance(other, PhaseTimes) else other).items():
            if seconds:
                self.add(name, float(seconds))

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase in `PHASES` order (phases never entered are left out)."""
        with self._lock:
            known = [(name, self._seconds[name]) for name in PHASES if name in self._seconds]
            other = sorted((k, v) for k, v in self._seconds.items() if k not in PHASES)
        return {name: round(seconds, 4) for name, seconds in known + other}

    def total(self) -> float:
        with self._lock:
            return sum(self._seconds.values())


@contextmanager
def collecting(times: PhaseTimes) -> Iterator[PhaseTimes]:
    """Phases run by this thread (and code it calls) inside the block add to `times`."""
    token = _collector.set(times)
    try:
        yield times
    finally:
        _collector.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name` for the collector of this thread (nothing when there is none)."""
    times = _collector.get()
    if times is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - start)


def current() -> PhaseTimes | None:
    """The collector of this thread, if any (for code that hands work to other threads)."""
    return _collector.get()
