"""What every hosted backend shares (http, gemini, openai): one request per image, bounded, retried, kept secret.

- `HostedBackend`: answers a batch with at most `model.concurrency` requests in
  flight (a thread pool rebuilt after pickling, for Ray and Spark workers),
  counts the sizes the model answered at (`answer_sizes`: the decode stage maps
  every answer back to its input's size), and masks its secrets (`_scrub`) out
  of whatever a server says back.
- `with_retries`: one call retried `model.max_retries` times on what the caller
  classifies as transient (429, 5xx, timeouts, connection errors), waiting
  `model.retry_backoff_s * 2**retry` with jitter, or longer when the server says
  how long (`Retry-After`, google.rpc.RetryInfo), up to `MAX_RETRY_AFTER_S`.
- `api_key`: the key from the environment variable named by `model.token_env`;
  it lives in memory only (never in the config, its dumps, logs or metadata).
- `estimate`: the cost and quota of a hosted run before it starts.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.io.images import decode_image
from vb_batch.masking import scrub
from vb_batch.models.base import ModelBackend, model_id

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig

log = logging.getLogger(__name__)

ANSWER_MAX_PIXELS = 64_000_000
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB image as PNG (fast compression: the bytes travel once)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def answer_image(data: bytes) -> np.ndarray:
    """The image bytes a model answered with, as RGB uint8; RowError("model_bad_answer") when they are not one."""
    try:
        return decode_image(data, ANSWER_MAX_PIXELS)
    except RowError as err:
        raise RowError("model_bad_answer", f"the answer's image: {err.message}") from None


def api_key(cfg: "ModelConfig", *, required: bool = True) -> str | None:
    """The API key from the environment variable `model.token_env` names (None when not required and unset)."""
    if not cfg.token_env:
        if required:
            raise ConfigError(f"model.token_env: the {cfg.backend} backend needs the name of the environment "
                              "variable that holds the API key, e.g. token_env: GEMINI_API_KEY")
        return None
    key = os.environ.get(cfg.token_env)
    if not key:
        raise ConfigError(f"model.token_env: the environment variable {cfg.token_env!r} is not set or empty")
    return key


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


@dataclass(frozen=True)
class Failure:
    """What went wrong with one call, as the backend classified it (its text already scrubbed)."""

    reason: str
    retryable: bool
    code: str = "model_http_error"  # the row's error code when no retry is left
    server_wait_s: float | None = None


def with_retries(call: Callable[[], Any], classify: Callable[[Exception], Failure | None], cfg: "ModelConfig",
                 shown: str) -> Any:
    """`call()`'s result, retried on transient failures; a `RowError` (code from `classify`) once retries run out.

    `classify` returns None for an exception that is not a failure of the call (a bug): it propagates.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raised
            failure = classify(exc)
            if failure is None:
                raise
        if not failure.retryable or attempt > cfg.max_retries:
            log.warning("%s: %s after %d attempt(s); the row gets an error", shown, failure.reason, attempt)
            return RowError(failure.code, f"{shown}: {failure.reason} after {attempt} attempt(s)")
        delay = retry_delay(attempt, cfg.retry_backoff_s, failure.server_wait_s)
        log.info("%s: %s; retry %d/%d in %.2f s", shown, failure.reason, attempt, cfg.max_retries, delay)
        time.sleep(delay)


class HostedBackend(ModelBackend):
    """A backend that sends each image to a remote model; see the module docstring."""

    default_profile = "hosted-zero-shot"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._secrets: set[str] = set()  # what a server might echo back and must never be shown
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # (height, width) the model answered at -> answers; the decode stage maps them back to the input's size.
        self.answer_sizes: Counter[tuple[int, int]] = Counter()

    def __getstate__(self):
        # Shipped to engine workers without its thread pool (and rebuilt there).
        state = dict(self.__dict__)
        state["_pool"], state["_pool_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix=f"vb-{self.name}")
            return self._pool

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def client(self) -> Any:
        """The vendor SDK's client, built on first use; None for a backend without one."""
        return None

    def predict(self, images, prompts, task, seeds):
        self.client()  # built here, once: built in racing threads, a dropped SDK client closes its shared transport
        calls = [self._executor().submit(self._answer_row, image, prompt, task, seed)
                 for image, prompt, seed in zip(images, prompts, seeds)]
        answers = [call.result() for call in calls]
        self.count_answer_sizes(images, answers)
        return answers

    def _answer_row(self, image: np.ndarray, prompt: str, task: str, seed: int) -> np.ndarray | RowError:
        raise NotImplementedError

    def count_answer_sizes(self, images, answers) -> None:
        """Count the sizes the model answered at; say so once per size that is not the input's."""
        for image, answer in zip(images, answers):
            if isinstance(answer, np.ndarray):
                size = tuple(answer.shape[:2])
                if size != tuple(image.shape[:2]) and size not in self.answer_sizes:
                    log.info("%s answered at %dx%d (W x H) for a %dx%d input; answers are mapped back to the "
                             "input's size", model_id(self.cfg), size[1], size[0], image.shape[1], image.shape[0])
                self.answer_sizes[size] += 1

    @classmethod
    def estimate(cls, cfg: "ModelConfig", rows: int, passes: int) -> dict[str, Any]:
        """The requests and cost of a run over `rows` rows with `passes` model passes per row (all tasks).

        One request paints one image, so requests = images = rows * passes. The
        price is the user's (`model.price_per_image`: vendors' prices change and
        differ per plan; the Gemini Batch API's is about half the online one):
        without it, `total` is None.

        >>> from vb_batch.config import ModelConfig
        >>> HostedBackend.estimate(ModelConfig(backend="gemini", model_name="m", price_per_image=0.02), 100, 3)["total"]
        6.0
        """
        requests = rows * passes
        price = cfg.price_per_image
        return {
            "model": model_id(cfg),
            "mode": cfg.mode if cfg.backend == "gemini" else "online",
            "rows": rows,
            "passes": passes,
            "requests": requests,
            "images": requests,
            "price_per_image": price,
            "total": None if price is None else round(requests * price, 6),
        }


def describe_estimate(estimate: dict[str, Any]) -> str:
    """One line for the run's log and summary."""
    cost = (f"{estimate['total']:.2f} at {estimate['price_per_image']} per image" if estimate["total"] is not None
            else "cost unknown (set model.price_per_image)")
    return (f"{estimate['model']} ({estimate['mode']}): {estimate['requests']} requests for {estimate['rows']} rows "
            f"x {estimate['passes']} passes; {cost}")
