"""The `openai` backend: hosted image editors through the official `openai` SDK's `images.edit`.

Each row is one `POST {base URL}/images/edits` (multipart): the image as a PNG
file, the task prompt, `model.model_name`, one image asked for (`n: 1`), and
`model.options` passed through (`size`, `quality`, `input_fidelity`,
`output_format`, `response_format`, ...). `model.endpoint` is the SDK's base
URL, so any server that implements the OpenAI images API works (None:
OpenAI's). The answer is the image in `data[0].b64_json`; an answer with only
a `url` is refused (ask for `response_format: b64_json` where the server
supports it): vb_batch never fetches a URL a model hands back.

- Each image is sized for the model (`vb_batch.models.hosted_limits`): gpt-image-1
  gets the nearest of its three sizes (padded, asked for as `size`), gpt-image-2 a
  16-px grid size of the image's aspect; the answer is cropped back.
  `usage` (input and output tokens) is kept per row with its cost.
- 429 `insufficient_quota` / `billing_hard_limit_reached` stop the run
  (`QuotaExhaustedError`: exit code 4, resume later).
- At most `model.concurrency` requests in flight. 429 (except quota
  exhaustion), 5xx, timeouts and connection errors are retried
  `model.max_retries` times with backoff, honouring `Retry-After` and
  `retry-after-ms` (up to 60 s). The SDK's own retry is off, so there is one
  retry policy (and one log line per retry) for every hosted backend.
- Row errors: `model_safety_block` (a moderation or content-policy refusal),
  `model_rate_limited` (429 after every retry, or no quota left),
  `model_http_error` (any other failure), `model_no_image` (no image in the
  answer), `model_bad_answer` (bytes that are not an image). Answers at another
  size are counted in `answer_sizes` and mapped back by the decode stage.
- The key comes from the environment variable `model.token_env` and stays in
  memory; a server that needs none (a local one) takes a `model.endpoint` and
  no `token_env`.

Example (the key in $OPENAI_API_KEY):

    model:
      backend: openai
      model_name: gpt-image-1
      token_env: OPENAI_API_KEY
      options: {size: 1024x1024, quality: high}
"""

from __future__ import annotations

import base64
import binascii
import logging

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.models.hosted import (
    RETRY_STATUS,
    Failure,
    HostedBackend,
    api_key,
    parse_retry_after,
    with_retries,
)
from vb_batch.models.http import server_text
from vb_batch.models.options import OpenAIOptions

log = logging.getLogger(__name__)

# Error codes OpenAI (and compatible servers) give a refused prompt or image.
SAFETY_CODES = frozenset({"moderation_blocked", "content_policy_violation", "content_filter", "safety_violation"})
# A 429 that waiting does not fix.
NO_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
# Arguments the backend sets itself.
RESERVED_OPTIONS = frozenset({"image", "prompt", "model", "n", "stream"})
# A server that needs no key still gets one from the SDK (it requires one): this placeholder.
NO_KEY = "unused"


class OpenAIImagesBackend(HostedBackend):
    name = "openai"
    options_model = OpenAIOptions

    def __init__(self, cfg):
        super().__init__(cfg)  # checks the options' problems (model.model_name)
        reserved = sorted(RESERVED_OPTIONS & set(cfg.options))
        if reserved:
            raise ConfigError(f"model.options: {reserved} are set by the openai backend itself")
        # A self-hosted server may need no key; OpenAI's own API always does.
        self._api_key = api_key(cfg, required=not cfg.endpoint) or NO_KEY
        self._secrets |= {self._api_key} - {NO_KEY}
        self._client = None

    def __repr__(self) -> str:  # never the key
        return f"OpenAIImagesBackend({self.cfg.model_name!r})"

    def __getstate__(self):
        state = super().__getstate__()
        state["_client"] = None
        return state

    @property
    def shown(self) -> str:
        return f"openai {self.cfg.model_name}"

    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(api_key=self._api_key, base_url=self.cfg.endpoint, max_retries=0,
                                         timeout=self.cfg.timeout_s)
        return self._client

    def _answer_row(self, image, prompt, task, seed):
        data, mime, fit = self.prepare(image, prompt)
        picture = (f"image.{mime.removeprefix('image/')}", data, mime)
        options = dict(self.cfg.options)
        if fit.aspect and "size" not in options:  # the size the image was fitted to: WIDTHxHEIGHT
            options["size"] = "{1}x{0}".format(*fit.canvas)
        response = with_retries(
            lambda: self.limited(lambda: self.client().images.edit(
                image=picture, prompt=prompt, model=self.cfg.model_name, n=1, **options)),
            self.classify, self.cfg, self.shown,
        )
        if isinstance(response, RowError):
            return response
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.record_usage(seed, {"input_tokens": usage.input_tokens or 0,
                                     "output_tokens": usage.output_tokens or 0, "thought_tokens": 0})
        data = response.data or []
        if not data:
            return RowError("model_no_image", "the answer has no image")
        if not data[0].b64_json:
            hint = " (it sent a URL: set model.options.response_format: b64_json)" if data[0].url else ""
            return RowError("model_no_image", f"the answer has no b64_json image{hint}")
        try:
            return self.fitted_answer(base64.b64decode(data[0].b64_json, validate=True), fit)
        except binascii.Error as exc:
            return RowError("model_bad_answer", f"the answer's b64_json is not base64 ({exc})")
        except RowError as err:
            return err

    def classify(self, exc: Exception) -> Failure | None:
        import openai

        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            code = str(error.get("code") or error.get("type") or "")
            message = error.get("message") or exc.message
            reason = self._scrub(f"HTTP {exc.status_code}{' ' + code if code else ''}: {server_text(str(message))}")
            if code in SAFETY_CODES:
                return Failure(reason, retryable=False, code="model_safety_block")
            headers = exc.response.headers
            ms = parse_retry_after(headers.get("retry-after-ms"))
            wait = ms / 1000 if ms is not None else parse_retry_after(headers.get("retry-after"))
            if exc.status_code == 429 and code in NO_QUOTA_CODES:
                self.quota_exhausted(f"{self.shown}: {reason}")
            if exc.status_code == 429:
                return Failure(reason, retryable=True, code="model_rate_limited", server_wait_s=wait)
            return Failure(reason, retryable=exc.status_code in RETRY_STATUS, server_wait_s=wait)
        if isinstance(exc, openai.APIConnectionError):  # timeouts too
            return Failure(f"{type(exc).__name__}: {self._scrub(server_text(str(exc)))}", retryable=True)
        return None
