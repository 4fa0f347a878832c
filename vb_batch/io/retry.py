"""The one retry helper: a call retried on transient failures, with backoff, jitter and the server's own wait.

Contract:

- `with_retries(call, classify, policy, shown)` makes at most
  `policy.max_retries + 1` attempts. After a failure that `classify` calls
  retryable it waits `retry_delay(...)`: `policy.retry_backoff_s * 2**retry`,
  scaled by a random factor in [0.5, 1] (rows that failed together do not
  retry together), and never less than what the server asked for
  (`Retry-After`, google.rpc.RetryInfo `retryDelay`), capped at
  `MAX_RETRY_AFTER_S`.
- It never raises for a classified failure: once retries run out, or at the
  first failure that is not retryable, it RETURNS a `RowError` with the
  failure's code and `"{shown}: {reason} after {n} attempt(s)"`, so the caller
  puts it in the row's place and the job goes on. An exception that
  `classify` does not recognise (returns None for) is a bug and propagates.
- Each retry logs one INFO line, the final failure one WARNING line; both show
  only `shown` and the failure's `reason`, which `classify` has already
  scrubbed of secrets.

Used by every remote model backend (the `http` backend on `vb_batch.io.http`,
the gemini and openai SDK backends around their SDK calls).

    >>> class Policy: max_retries, retry_backoff_s = 2, 0.0
    >>> answers = iter([OSError("reset"), "painted"])
    >>> def call():
    ...     answer = next(answers)
    ...     if isinstance(answer, Exception):
    ...         raise answer
    ...     return answer
    >>> with_retries(call, lambda exc: Failure(str(exc), retryable=True, code="x"), Policy(), "endpoint")
    'painted'
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from vb_batch.errors import RowError

log = logging.getLogger(__name__)

# The longest a server may make a row wait between two attempts (a longer Retry-After is cut to this).
MAX_RETRY_AFTER_S = 60.0
# Statuses that say "try again later": timeout, too early, too many requests, any server error.
RETRY_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))

T = TypeVar("T")


class RetryPolicy(Protocol):
    """How often and how patiently to retry (`vb_batch.config.ModelConfig` is one)."""

    max_retries: int  # retries after the first attempt
    retry_backoff_s: float  # the first wait; doubles per retry


@dataclass(frozen=True)
class Failure:
    """What went wrong with one attempt, as the caller classified it (its text already scrubbed)."""

    reason: str
    retryable: bool
    code: str  # the row's error code when no retry is left
    server_wait_s: float | None = None  # what the server asked for (Retry-After, RetryInfo)


def parse_retry_after(value: Any) -> float | None:
    """Seconds from a `Retry-After` header ("2", "0.5") or a RetryInfo `retryDelay` ("1.5s"); None otherwise."""
    if value is None:
        return None
    text = str(value).strip().lower().removesuffix("s")
    try:
        seconds = float(text)
    except ValueError:  # an HTTP date: the backoff is as good a guess
        return None
    return seconds if seconds >= 0 else None


def retry_delay(attempt: int, backoff_s: float, server_wait_s: float | None = None) -> float:
    """Seconds to wait before retry `attempt` (1-based): exponential with jitter, at least what the server asked."""
    # Jitter spreads the retries of concurrent rows that failed together.
    delay = backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
    return max(delay, min(server_wait_s, MAX_RETRY_AFTER_S)) if server_wait_s is not None else delay


def with_retries(
    call: Callable[[], T], classify: Callable[[Exception], Failure | None], policy: RetryPolicy, shown: str
) -> T | RowError:
    """`call()`'s result, retried on transient failures; a `RowError` (code from `classify`) once retries run out."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raised
            failure = classify(exc)
            if failure is None:
                raise
        if not failure.retryable or attempt > policy.max_retries:
            log.warning("%s: %s after %d attempt(s); the row gets an error", shown, failure.reason, attempt)
            return RowError(failure.code, f"{shown}: {failure.reason} after {attempt} attempt(s)")
        delay = retry_delay(attempt, policy.retry_backoff_s, failure.server_wait_s)
        log.info("%s: %s; retry %d/%d in %.2f s", shown, failure.reason, attempt, policy.max_retries, delay)
        time.sleep(delay)
