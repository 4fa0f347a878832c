"""The `http` backend: a hosted generalist behind an HTTP endpoint (image + prompt -> painted image).

Protocol: `POST {model.endpoint}` with the JSON body
`{"prompt": str, "image": base64 PNG, **model.options}`; the answer is JSON
`{"image": base64 PNG}` (any image format PIL reads; a `data:` URL works too).

- Auth: the token is read from the environment variable named by
  `model.token_env` and sent as `<model.token_header>: <model.token_scheme> <token>`
  (default `Authorization: Bearer ...`). It never enters the job config, the
  logs, the row errors or the output's metadata; endpoints are shown
  without their query string.
- What a server says back (its reason phrase, the start of a JSON or text
  error body) goes into row errors and log lines only after the token, every
  `model.headers` value and the endpoint's query string (whole and each value)
  are masked out of it, also URL-quoted or JSON-escaped: a server that echoes a
  request cannot leak it.
- Requests go through `vb_batch.io.http`: at most `model.concurrency` in
  flight, on kept-alive connections, `*_proxy` / `no_proxy` honoured;
  `model.timeout_s` bounds each socket operation (connect, each read); an
  answer may hold at most `ANSWER_MAX_BYTES`.
- 429, 5xx, timeouts and connection errors are retried `model.max_retries`
  times by `vb_batch.io.retry`, waiting `model.retry_backoff_s` * 2**retry
  (with jitter; a server's `Retry-After` is honoured up to 60 s).
- Redirects are refused (the token must not follow a request elsewhere).
- A row whose calls keep failing gets `vb_error = {code: "model_http_error"}`,
  one whose answer is not an image `{code: "model_bad_answer"}`: the backend
  returns that `RowError` in the row's place and the job goes on.

Example (a job config; the token is in $PAINTER_TOKEN):

    model:
      backend: http
      endpoint: https://painter.example.com/v1/edit
      token_env: PAINTER_TOKEN
      concurrency: 8
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.io.http import Answer, BodyTooLarge, Transport, TransportError
from vb_batch.io.images import decode_image
from vb_batch.masking import scrub, url_secrets
from vb_batch.models.base import ModelBackend, public_url
from vb_batch.models.hosted import (
    ANSWER_MAX_PIXELS,
    RETRY_STATUS,
    Failure,
    parse_retry_after,
    png_bytes,
    with_retries,
)
from vb_batch.models.options import HttpOptions
from vb_batch.models.preflight import Check

log = logging.getLogger(__name__)

# How much of a server's error body is read, and shown in a row error: enough for an API's message.
ERROR_BODY_READ_BYTES = 4096
ERROR_TEXT_CHARS = 300
# The most an answer may hold: the base64 PNG of the largest image decoded (ANSWER_MAX_PIXELS), with room.
ANSWER_MAX_BYTES = 512 << 20


class EndpointRefused(Exception):
    """The endpoint answered with a status other than 2xx (a redirect too: the token must not follow it)."""

    def __init__(self, answer: Answer):
        super().__init__(f"HTTP {answer.status}")
        self.answer = answer


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def server_text(raw: bytes | str, limit: int = ERROR_TEXT_CHARS) -> str:
    """Text a server sent, fit for one line of a message: printable, whitespace collapsed, bounded."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(answer: Answer) -> str:
    """The start of an error answer's body when it is JSON or plain text (an API's own message); else ""."""
    content_type = answer.headers.get("Content-Type", "").lower()
    if not ("json" in content_type or content_type.startswith("text/plain")):
        return ""  # an HTML error page says nothing the status does not
    return server_text(answer.body[:ERROR_BODY_READ_BYTES])


def read_answer(body: bytes) -> np.ndarray:
    """The painting in an answer body, as RGB uint8; RowError("model_bad_answer") for anything else."""
    try:
        answer = json.loads(body)
        encoded = answer["image"]
        if not isinstance(encoded, str):
            raise TypeError(f"'image' is a {type(encoded).__name__}, not a base64 string")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        data = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        why = f"the answer is not JSON with a base64 'image' ({type(exc).__name__}: {exc})"
        raise RowError("model_bad_answer", why) from None
    try:
        return decode_image(data, ANSWER_MAX_PIXELS)
    except RowError as err:
        raise RowError("model_bad_answer", f"the answer's image: {err.message}") from None


class HttpBackend(ModelBackend):
    name = "http"
    options_model = HttpOptions

    @classmethod
    def provenance(cls, cfg) -> str:
        source = public_url(cfg.endpoint) if cfg.endpoint else ""
        return f"{source}@{cfg.revision}" if cfg.revision else source

    @classmethod
    def preflight(cls, cfg, *, local):
        if cfg.token_env and not os.environ.get(cfg.token_env):
            return [Check("model token", "error", f"model.token_env: the environment variable {cfg.token_env!r} "
                                                  "is not set or empty here", True)]
        return []

    def __init__(self, cfg):
        super().__init__(cfg)  # checks the options' problems (model.endpoint)
        reserved = sorted({"prompt", "image"} & set(cfg.options))
        if reserved:
            raise ConfigError(f"model.options: {reserved} are set by the http backend itself")
        self.url = cfg.endpoint
        self.shown_url = public_url(cfg.endpoint)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **cfg.headers}
        # What a server might echo back and must never be shown: masked out of its text by `_scrub`.
        self._secrets = {*cfg.headers.values(), *url_secrets(cfg.endpoint)}
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ConfigError(f"model.token_env: the environment variable {cfg.token_env!r} is not set or empty")
            self._headers[cfg.token_header] = f"{cfg.token_scheme} {token}" if cfg.token_scheme else token
            self._secrets |= {token, self._headers[cfg.token_header]}
        self._transport = Transport(pool_size=cfg.concurrency, use_env_proxies=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:  # the headers hold the token
        return f"HttpBackend({self.shown_url!r})"

    def __getstate__(self):
        # Shipped to engine workers without its thread pool and connections (rebuilt there).
        state = dict(self.__dict__)
        state["_pool"], state["_pool_lock"], state["_transport"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()
        self._transport = Transport(pool_size=self.cfg.concurrency, use_env_proxies=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="vb-http")
            return self._pool

    def predict(self, images, prompts, task, seeds):
        calls = [self._executor().submit(self._paint, image, prompt) for image, prompt in zip(images, prompts)]
        return [call.result() for call in calls]

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _paint(self, image: np.ndarray, prompt: str) -> np.ndarray | RowError:
        body = json.dumps({"prompt": prompt, "image": png_base64(image), **self.cfg.options}).encode()
        answer = with_retries(lambda: self._post(body), self.classify, self.cfg, self.shown_url)
        if isinstance(answer, RowError):
            return answer
        try:
            return read_answer(answer)
        except RowError as err:
            return RowError(err.code, self._scrub(err.message))

    def _post(self, body: bytes) -> bytes:
        """One POST; the answer's body, or `EndpointRefused` / a transport fault (classified by `classify`)."""
        answer = self._transport.send(
            "POST", self.url, headers=self._headers, body=body, timeout_s=self.cfg.timeout_s,
            max_body_bytes=ANSWER_MAX_BYTES, error_body_bytes=ERROR_BODY_READ_BYTES,
        )
        if not answer.ok:
            raise EndpointRefused(answer)
        return answer.body

    def classify(self, exc: Exception) -> Failure | None:
        """A failed POST: retryable (429, 5xx, no or broken connection) or not, the server's wait, text scrubbed."""
        if isinstance(exc, EndpointRefused):
            answer = exc.answer
            reason = f"HTTP {answer.status} {self._scrub(server_text(answer.reason, 100))}".rstrip()
            detail = self._scrub(error_body(answer))
            return Failure(
                f"{reason}: {detail}" if detail else reason,
                retryable=answer.status in RETRY_STATUS,
                server_wait_s=parse_retry_after(answer.headers.get("Retry-After")),
            )
        if isinstance(exc, TransportError):
            return Failure(f"{type(exc).__name__}: {self._scrub(server_text(exc.detail))}", retryable=True)
        if isinstance(exc, BodyTooLarge):
            return Failure(f"the answer is larger than {exc.limit} bytes", retryable=False, code="model_bad_answer")
        return None
