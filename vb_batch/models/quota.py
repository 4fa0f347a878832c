"""One rate limiter per hosted model and run: requests per minute and requests in flight, shared by every worker.

Contract:

- `SlotBook` holds the limits' state (the next free slot, the requests in flight) and
  hands out slots: `grant(wanted)` answers up to `wanted` slots as delays from now,
  spaced 60 / `model.requests_per_minute` seconds apart (no burst), never more in flight
  than `model.max_concurrent_requests`; `release(count)` gives slots back. It lives
  where the run's one copy lives: in this process (local engine), in a named Ray actor
  (`vb-rate-<run_id>`), or in a token server on the Spark driver (`quota_share`).
- `RateLimiter` is a process's door to a book: `with limiter.request():` waits for a
  slot. The threads of a process that wait at the same time are granted their slots in
  one call of the book (one actor call or HTTP request for all of them, not one each).
- `shared_limiter(cfg)` is the limiter of a model (backend, endpoint, model id, key
  variable, limits) in this process: the run's shared book when one was attached
  (`attach`, done by `cached_backend` in every worker from `plan.rate_limiter`), else a
  book of this process's own (the local engine; the Ray Data and Spark DataFrame
  helpers, where each worker process then paces itself).
- `QuotaStop`: a backend's record that the service said the quota is gone for the
  day. Every request after it (in any of the backend's threads) raises
  `QuotaExhaustedError` at once, for `STOP_S` seconds, so a run stops within seconds
  instead of each row waiting out its own retries. It is the backend's, not the
  process's: a run resumed in the same process (a notebook) tries again. A shared book
  is told too (`RateLimiter.stop`), so every worker of the run stops at its next request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from vb_batch.errors import QuotaExhaustedError
from vb_batch.models.slot_book import GRANT_WAIT_S as GRANT_WAIT_S
from vb_batch.models.slot_book import SlotBook

STOP_S = 60.0  # how long a stop holds in this process (a later run tries again)

_LIMITERS: dict[tuple, RateLimiter] = {}  # (model key, book address) -> its limiter in this process
_ATTACHED: dict[tuple, str] = {}  # model key -> the address of the run's shared book
_LOCK = threading.Lock()


class Book(Protocol):
    """Where slots come from: a `SlotBook`, or a worker's proxy of the run's shared one."""

    def grant(self, wanted: int) -> tuple[list[float], str | None]: ...

    def release(self, count: int) -> None: ...

    def stop(self, why: str) -> None: ...


class RateLimiter:
    """A process's door to a book of slots (its own, or the run's shared one), for every thread of the process."""

    def __init__(self, requests_per_minute: float | None, max_concurrent: int | None, book: Book | None = None):
        self.limited = bool(requests_per_minute or max_concurrent)
        self.bounded = bool(max_concurrent)
        self.shared = book is not None
        self.book: Book = book if book is not None else SlotBook(requests_per_minute, max_concurrent)
        self._cond = threading.Condition()
        self._granted: deque[float] = deque()  # monotonic times of the slots granted, not yet taken
        self._waiting = 0  # threads waiting for a slot
        self._asking = False  # a thread is asking the book for the waiting threads' slots
        self._stopped: str | None = None

    @contextlib.contextmanager
    def request(self, stop: QuotaStop | None = None) -> Iterator[None]:
        """Hold one request's slot: at most `max_concurrent` at once, spaced by the per-minute rate."""
        if stop is not None:
            stop.check()
        if not self.limited:
            yield
            return
        due = self._slot()
        try:
            time.sleep(max(0.0, due - time.monotonic()))
            if stop is not None:
                stop.check()
            yield
        finally:
            if self.bounded:
                self.book.release(1)

    def stop(self, why: str) -> None:
        """Tell the run's shared book the quota is gone (a process's own book: its backend's `QuotaStop` says it)."""
        if self.shared:
            self.book.stop(why)

    def _slot(self) -> float:
        """Wait for a slot (monotonic time it may start); the first waiting thread asks for every waiting one."""
        with self._cond:
            self._waiting += 1
            try:
                while not self._granted:
                    if self._stopped:
                        raise QuotaExhaustedError(self._stopped)
                    if self._asking:
                        self._cond.wait()
                        continue
                    self._asking = True
                    wanted = self._waiting
                    self._cond.release()
                    try:
                        delays, stopped = self.book.grant(wanted)
                    finally:
                        self._cond.acquire()
                        self._asking = False
                        self._cond.notify_all()
                    now = time.monotonic()
                    self._granted.extend(now + delay for delay in delays)
                    if stopped:
                        self._stopped = stopped
                        if self.bounded and self._granted:
                            self.book.release(len(self._granted))
                        self._granted.clear()
                return self._granted.popleft()
            finally:
                self._waiting -= 1


def _model_key(cfg) -> tuple:
    return (cfg.backend, cfg.endpoint, cfg.model_name, cfg.token_env, cfg.requests_per_minute,
            cfg.max_concurrent_requests)


def attach(cfg, address: str | None) -> None:
    """Use the run's shared book at `address` for this model in this process (None: the process's own)."""
    key = _model_key(cfg)
    with _LOCK:
        if _ATTACHED.get(key) == address:
            return
        if address is None:
            _ATTACHED.pop(key, None)
        else:
            _ATTACHED[key] = address
        for stale in [k for k in _LIMITERS if k[0] == key and k[1] not in (None, address)]:
            del _LIMITERS[stale]  # an earlier run's book


def shared_limiter(cfg) -> RateLimiter:
    """This process's limiter for the model (see the module docstring); rebuilt when its limits change."""
    rpm, concurrent = cfg.requests_per_minute, cfg.max_concurrent_requests
    key = _model_key(cfg)
    with _LOCK:
        address = _ATTACHED.get(key)
        if (key, address) not in _LIMITERS:
            book: Any = None
            if address is not None:
                from vb_batch.models.quota_share import remote_book

                book = remote_book(address)
            _LIMITERS[key, address] = RateLimiter(rpm, concurrent, book)
        return _LIMITERS[key, address]


class QuotaStop:
    """The quota is gone: `check` raises `QuotaExhaustedError` for `STOP_S` after `stop` (every thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._until = 0.0
        self._why = ""

    def stop(self, why: str) -> None:
        with self._lock:
            self._until, self._why = time.monotonic() + STOP_S, why

    def check(self) -> None:
        with self._lock:
            if time.monotonic() < self._until:
                raise QuotaExhaustedError(self._why)
