"""The run's limits as state: request slots spaced by the per-minute rate, at most so many in flight.

`SlotBook` lives wherever the run keeps its one copy: in this process, in a named Ray actor, or in
the token server on a Spark driver (`vb_batch.models.quota_share`); `vb_batch.models.quota`'s
`RateLimiter` is each process's door to it. A module of its own, so that both import it and
neither imports the other.
"""

from __future__ import annotations

import threading
import time

GRANT_WAIT_S = 5.0  # how long a grant waits for a request in flight to end before answering "none yet"


class SlotBook:
    """The limits' state: request slots spaced by the per-minute rate, at most `max_concurrent` in flight."""

    def __init__(self, requests_per_minute: float | None, max_concurrent: int | None):
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._next = 0.0  # monotonic time of the next free slot
        self._stopped: str | None = None
        self._cond = threading.Condition()

    def grant(self, wanted: int, wait_s: float = GRANT_WAIT_S) -> tuple[list[float], str | None]:
        """Up to `wanted` slots as delays from now (seconds), and why the run stopped (None: it did not).

        With a concurrency limit it waits up to `wait_s` for a request in flight to end; none did: no
        slots (the caller asks again: a call never blocks past a worker's timeout).
        """
        with self._cond:
            if self.max_concurrent:
                deadline = time.monotonic() + wait_s
                while self.in_flight >= self.max_concurrent and not self._stopped:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return [], None
                    self._cond.wait(left)
                wanted = min(wanted, self.max_concurrent - self.in_flight)
            if self._stopped:
                return [], self._stopped
            wanted = max(1, wanted)
            if self.max_concurrent:
                self.in_flight += wanted
            now = time.monotonic()
            delays = []
            for _ in range(wanted):
                slot = max(now, self._next)
                self._next = slot + self.interval
                delays.append(slot - now)
            return delays, None

    def release(self, count: int) -> None:
        """`count` requests in flight ended."""
        if not self.max_concurrent:
            return
        with self._cond:
            self.in_flight = max(0, self.in_flight - count)
            self._cond.notify_all()

    def stop(self, why: str) -> None:
        """The quota is gone: every later grant says so."""
        with self._cond:
            self._stopped = self._stopped or why
            self._cond.notify_all()
