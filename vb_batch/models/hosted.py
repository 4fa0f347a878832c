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
- Requests sized for the model (`vb_batch.models.hosted_limits`: one table of
  every model's inline limit, encodings and answer sizes): `prepare` resizes an
  image to what the model answers at, pads it to the nearest aspect ratio the
  model has (asked for per row) and encodes it within the inline limit;
  `fitted_answer` crops the answer back to the image's box.
- Quota: every request holds a slot of the model's `RateLimiter`
  (`model.requests_per_minute`, `model.max_concurrent_requests`: the run's one
  limiter on Ray and Spark, see `vb_batch.models.quota`); a 429 that
  says the day's quota is gone raises `QuotaExhaustedError` (`quota_exhausted`),
  a clean stop of the run, not a row error.
- Usage: the tokens the service reports per request are added up per row
  (`record_usage`, by the row's seed) with their cost at the model's token prices;
  the model stage takes them (`take_usage`) into the row's `vb_usage` column.
- `cost_estimate`: the requests, tokens and cost of a hosted run before it starts,
  at the same token prices.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from vb_batch.errors import QuotaExhaustedError, RowError
from vb_batch.io import retry
from vb_batch.io.images import decode_image
from vb_batch.io.retry import MAX_RETRY_AFTER_S as MAX_RETRY_AFTER_S
from vb_batch.io.retry import RETRY_STATUS as RETRY_STATUS
from vb_batch.io.retry import parse_retry_after as parse_retry_after
from vb_batch.io.retry import retry_delay as retry_delay
from vb_batch.io.retry import with_retries as with_retries
from vb_batch.masking import scrub
from vb_batch.models.base import ModelBackend, model_id, public_url
from vb_batch.models.hosted_limits import (
    GEMINI_IMAGE_SIZES,
    OPENAI_QUALITY_TOKENS,
    Fit,
    ModelLimits,
    add_usage,
    crop_answer,
    encode_request,
    fit_request,
    limits_for,
    prices_of,
)
from vb_batch.models.quota import QuotaStop, RateLimiter, shared_limiter

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
        self.limits = self.model_limits(cfg)
        self.quota_stop = QuotaStop()
        self._cancel = threading.Event()  # set when the calls started before it should end (`cancel_calls`)
        self._usage: dict[int, dict[str, Any]] = {}  # row seed -> tokens and cost so far (all its tasks)
        self._usage_lock = threading.Lock()

    def __getstate__(self):
        # Shipped to engine workers without its thread pool and limiter (and rebuilt there).
        state = dict(self.__dict__)
        for name in ("_pool", "_pool_lock", "_usage_lock", "quota_stop", "_cancel"):
            state[name] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()
        self._usage_lock = threading.Lock()
        self.quota_stop = QuotaStop()
        self._cancel = threading.Event()

    @classmethod
    def model_limits(cls, cfg: "ModelConfig") -> ModelLimits:
        """The table's entry for the model (`model.request_size: input`: its sizes dropped, its limits kept)."""
        limits = limits_for(cfg.backend, cfg.model_name)
        if cfg.request_size == "input":
            limits = dataclasses.replace(limits, ratios={}, grid=0)
        return limits

    @classmethod
    def answer_metadata(cls, cfg: "ModelConfig") -> dict[str, str]:
        limits = cls.model_limits(cfg)
        if limits.ratios or limits.grid:
            return {"vb.model_fit": "pad: each image was resized and padded (black, centred) to the nearest size "
                                    "the model answers at; the answer was cropped to the image's box and resized "
                                    "to its size (no stretch)"}
        return {}

    @classmethod
    def reports_usage(cls, cfg: "ModelConfig") -> bool:
        return True

    # ------------------------------------------------------------------ requests, quota, usage

    def image_scale(self) -> int:
        """How many times the table's 1K sizes the model answers at (Gemini 3's image_config.image_size)."""
        image_config = self.cfg.options.get("image_config") or {}
        return GEMINI_IMAGE_SIZES.get(str(image_config.get("image_size", "1K")).upper(), (1, None))[0]

    def asked_aspect(self) -> str | None:
        """An aspect ratio the user fixed in the options (every row then asks for it)."""
        return (self.cfg.options.get("image_config") or {}).get("aspect_ratio")

    def prepare(self, image: np.ndarray, text: str) -> tuple[bytes, str, Fit]:
        """(image bytes, MIME type, fit) of one request: sized for the model, within its inline limit."""
        sent, fit = fit_request(image, self.limits, self.image_scale(), self.asked_aspect())
        data, mime = encode_request(sent, self.limits, len(text.encode()))
        return data, mime, fit

    def fitted_answer(self, data: bytes, fit: Fit) -> np.ndarray:
        """The answer's image, cropped to the row's image box (RowError("model_bad_answer") when not an image)."""
        return crop_answer(answer_image(data), fit)

    @property
    def limiter(self) -> RateLimiter:
        """The model's rate limiter in this process: the run's shared one where the engine started one."""
        return shared_limiter(self.cfg)

    def limited(self, call):
        """`call()` holding a slot of the model's rate limiter (every SDK request goes through here)."""
        with self.limiter.request(self.quota_stop):
            return call()

    @property
    def calls_in_flight(self) -> int:
        return 1

    @property
    def cancelled(self) -> threading.Event:
        """What a call started now watches: set when the model stage is closed before the call ends."""
        return self._cancel

    def cancel_calls(self) -> None:
        with self._pool_lock:
            cancel, self._cancel = self._cancel, threading.Event()
        cancel.set()

    def quota_exhausted(self, why: str) -> None:
        """Stop every request of this model in this process and raise `QuotaExhaustedError`."""
        self.quota_stop.stop(why)
        with contextlib.suppress(Exception):  # the other workers then stop at their next request
            self.limiter.stop(why)
        raise QuotaExhaustedError(why)

    def row_cost(self, usage: dict[str, int]) -> float | None:
        """What one request's tokens cost at the model's token prices (None: the prices are unknown)."""
        prices = prices_of(self.cfg, self.limits)
        if prices is None:
            return None
        return prices.cost(usage, self.limits.batch_discount if self.request_mode(self.cfg) == "batch" else 1.0)

    def record_usage(self, seed: int, usage: dict[str, int] | None) -> None:
        """Add one request's tokens (and their cost) to its row's."""
        if not usage:
            return
        usage = {**usage, "cost": self.row_cost(usage)}
        with self._usage_lock:
            self._usage[seed] = add_usage(self._usage.get(seed, {}), usage)

    def take_usage(self, seed: int) -> dict[str, Any] | None:
        with self._usage_lock:
            return self._usage.pop(seed, None)

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
        """The requests, tokens and cost of a run over `rows` rows with `passes` model passes per row (all tasks).

        One request paints one image, so requests = images = rows * passes. The cost is
        `model.price_per_image` per image when set; else the tokens one request is billed
        (an input image at the size the model answers at, 1:1, and the answer image; the
        prompt's few tokens aside) at the model's token prices (`model.token_prices` over
        the table's), half for a Batch API. Without either, `total` is None.

        >>> from vb_batch.config import ModelConfig
        >>> HostedBackend.cost_estimate(ModelConfig(backend="gemini", model_name="m", price_per_image=0.02), 100, 3)["total"]
        6.0
        """
        requests = rows * passes
        tokens = cls.request_tokens(cfg)
        price = cfg.price_per_image
        per_request = price
        if price is None and tokens is not None:
            limits = cls.model_limits(cfg)
            prices = prices_of(cfg, limits)
            if prices is not None:
                discount = limits.batch_discount if cls.request_mode(cfg) == "batch" else 1.0
                per_request = prices.cost(tokens, discount)
        return {
            "model": model_id(cfg),
            "mode": cls.request_mode(cfg),
            "rows": rows,
            "passes": passes,
            "requests": requests,
            "images": requests,
            "price_per_image": price,
            "tokens_per_request": tokens,
            "cost_per_request": per_request,
            "total": None if per_request is None else round(requests * per_request, 6),
        }

    @classmethod
    def request_tokens(cls, cfg: "ModelConfig") -> dict[str, int] | None:
        """The tokens one request is billed (input image at the model's 1:1 size, output image); None: unknown."""
        limits = cls.model_limits(cfg)
        if not limits.ratios or limits.output_tokens is None:
            return None
        scale, output = 1, limits.output_tokens
        image_config = cfg.options.get("image_config") or {}
        if "image_size" in image_config:
            scale, tokens = GEMINI_IMAGE_SIZES.get(str(image_config["image_size"]).upper(), (1, None))
            output = tokens or output
        if cfg.backend == "openai":
            output = OPENAI_QUALITY_TOKENS.get(str(cfg.options.get("quality", "auto")), output)
        width, height = next(iter(limits.ratios.values()))
        image = limits.input_image_tokens(width * scale, height * scale)
        return None if image is None else {"input_tokens": image, "output_tokens": output, "thought_tokens": 0}

    @classmethod
    def request_mode(cls, cfg: "ModelConfig") -> str:
        """How requests are sent, for the estimate: online (one at a time), or a vendor's batch API."""
        return "online"


def describe_estimate(estimate: dict[str, Any]) -> str:
    """One line for the run's log and summary."""
    tokens = estimate.get("tokens_per_request")
    if estimate["total"] is None:
        cost = "cost unknown (set model.token_prices or model.price_per_image)"
    elif estimate.get("price_per_image") is not None:
        cost = f"{estimate['total']:.2f} at {estimate['price_per_image']} per image"
    else:
        cost = (f"{estimate['total']:.4f} US$ at {tokens['input_tokens']} input + {tokens['output_tokens']} output "
                "tokens a request")
    return (f"{estimate['model']} ({estimate['mode']}): {estimate['requests']} requests for {estimate['rows']} rows "
            f"x {estimate['passes']} passes; {cost}")
