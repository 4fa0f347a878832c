"""What every hosted backend shares (http, gemini, openai): one request per image, bounded, retried, kept secret.

- `HostedBackend`: answers a batch with at most `model.concurrency` requests in
  flight (a thread pool rebuilt after pickling, for Ray and Spark workers),
  counts the sizes the model answered at (`answer_sizes`: the decode stage maps
  every answer back to its input's size), and masks its secrets (`_scrub`) out
  of whatever a server says back.
- `with_retries` (from `vb_batch.io.retry`, with `model.max_retries` and
  `model.retry_backoff_s` as its policy): one call retried on what the backend
  classifies as transient (429, 5xx, timeouts, connection errors), with backoff
  and jitter, or longer when the server says how long (`Retry-After`,
  google.rpc.RetryInfo), up to `MAX_RETRY_AFTER_S`. `Failure` here defaults
  the row's code to model_http_error.
- `api_key`: the key from the environment variable named by `model.token_env`;
  it lives in memory only (never in the config, its dumps, logs or metadata).
- `cost_estimate`: the requests and cost of a hosted run before it starts.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.io import retry
from vb_batch.io.images import decode_image
from vb_batch.io.retry import MAX_RETRY_AFTER_S as MAX_RETRY_AFTER_S
from vb_batch.io.retry import RETRY_STATUS as RETRY_STATUS
from vb_batch.io.retry import parse_retry_after as parse_retry_after
from vb_batch.io.retry import retry_delay as retry_delay
from vb_batch.io.retry import with_retries as with_retries
from vb_batch.masking import scrub
from vb_batch.models.base import ModelBackend, model_id, public_url

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig

log = logging.getLogger(__name__)

ANSWER_MAX_PIXELS = 64_000_000


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


@dataclass(frozen=True)
class Failure(retry.Failure):
    """A failed model call (see `vb_batch.io.retry`); the row's code is model_http_error unless said otherwise."""

    code: str = "model_http_error"


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
    def provenance(cls, cfg: "ModelConfig") -> str:
        """The vendor's model id (and a base URL of the user's), never a key."""
        source = cfg.model_name or "?"
        if cfg.endpoint:
            source += f"+endpoint={public_url(cfg.endpoint)}"
        return f"{source}@{cfg.revision}" if cfg.revision else source

    @classmethod
    def cost_estimate(cls, cfg: "ModelConfig", rows: int, passes: int) -> dict[str, Any]:
        """The requests and cost of a run over `rows` rows with `passes` model passes per row (all tasks).

        One request paints one image, so requests = images = rows * passes. The
        price is the user's (`model.price_per_image`: vendors' prices change and
        differ per plan; the Gemini Batch API's is about half the online one):
        without it, `total` is None.

        >>> from vb_batch.config import ModelConfig
        >>> HostedBackend.cost_estimate(ModelConfig(backend="gemini", model_name="m", price_per_image=0.02), 100, 3)["total"]
        6.0
        """
        requests = rows * passes
        price = cfg.price_per_image
        return {
            "model": model_id(cfg),
            "mode": cls.request_mode(cfg),
            "rows": rows,
            "passes": passes,
            "requests": requests,
            "images": requests,
            "price_per_image": price,
            "total": None if price is None else round(requests * price, 6),
        }



    @classmethod
    def request_mode(cls, cfg: "ModelConfig") -> str:
        """How requests are sent, for the estimate: online (one at a time), or a vendor's batch API."""
        return "online"


def describe_estimate(estimate: dict[str, Any]) -> str:
    """One line for the run's log and summary."""
    cost = (f"{estimate['total']:.2f} at {estimate['price_per_image']} per image" if estimate["total"] is not None
            else "cost unknown (set model.price_per_image)")
    return (f"{estimate['model']} ({estimate['mode']}): {estimate['requests']} requests for {estimate['rows']} rows "
            f"x {estimate['passes']} passes; {cost}")
