"""Each model backend's own config keys: one pydantic model per backend, unknown keys forbidden.

A job's `model:` section stays one flat mapping. Its common keys (backend, path,
revision, profile, prompts, batch_size, group_window, device, dtype, seed,
decode_on_device) are declared on `vb_batch.config.ModelConfig`; every other
key belongs to the chosen backend, which declares them as a `BackendOptions`
subclass (`ModelBackend.options_model`). Validation (`ModelConfig`) checks the
backend's keys with that model and refuses a key the backend does not use,
naming the backends that do: `model.vertex: not used by backend 'identity'
(used by: gemini)`. A key set to null sets nothing and is not refused.

Contract:

- This module imports nothing but pydantic and the standard library, so a
  config validates without torch, diffusers or the vendors' SDKs installed.
  That is why the built-in backends' options live here rather than next to
  their backends: `BUILTIN_OPTIONS` maps each built-in backend class (its
  "module:Class" target) to its model, and tests check that each class
  declares the same one.
- A key is declared once (shared keys through the mixins below), so its type
  and default are the same for every backend that takes it.
- `problems(model_cfg)` is the options' check across keys (a checkpoint or an
  endpoint required): one line per problem, `model.<key>: what to do`.
- A backend that declares no options (a user's backend written before options
  existed) gets `FreeFormOptions`: the free-form `model.options` mapping, and
  nothing else beyond the common keys.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig


def http_url(url: str | None, example: str, credentials_hint: str) -> str | None:
    """`url` when it is a plain http(s) URL with a host and no user:password@; the messages never echo it
    (the config is stored with the output and printed by `validate`; a query string may hold a key)."""
    if url is None:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError(f"is not a URL; give it as {example}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"must be an http:// or https:// URL with a host: {example}")
    if "@" in parts.netloc:
        raise ValueError(f"must not carry credentials (user:password@): {credentials_hint}")
    return url


# What a key no backend (and no section) declares is told.
UNKNOWN_KEY = "unknown key (check the spelling; see `vb-batch run --help`)"

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CREDENTIAL_HEADER_WORDS = ("auth", "token", "key", "secret", "password", "cookie", "credential")


class BackendOptions(BaseModel):
    """Base of every backend's options: no keys of its own; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def problems(self, model: "ModelConfig") -> list[str]:
        """What these options and the common keys (`model`) lack together, one `model.<key>: ...` line each.

        Checked with the rest of the job config (`validate`, `plan`, `run` exit 2 on any), and
        again when the backend is created (`ModelBackend.__init__`).
        """
        return []


class FreeFormOptions(BackendOptions):
    """Options of a backend that declares none: the free-form `model.options` mapping, passed through."""

    options: dict[str, Any] = Field(default_factory=dict, description="free-form arguments for the backend")


# ---------------------------------------------------------------------------- local checkpoints


class ResizingOptions(BackendOptions):
    # The model's working size: Marigold's longer side; the diffusers edit pipelines' side of the
    # equal-area square (None: 1024, about 1 megapixel). 0: the input's own size.
    processing_resolution: int | None = Field(
        default=None, ge=0,
        description="model working size (None: the model's default; 0: the input's own size)",
    )


class DenoiserOptions(ResizingOptions):
    num_inference_steps: int | None = Field(
        default=None, gt=0,
        description="denoising steps (None: the pipeline's default)",
    )
    compile: bool = Field(default=False, description="torch.compile the denoiser (transformer or UNet)")
    # UNet and VAE in channels-last memory (the same maps). Often faster for convolutions on GPUs
    # in half precision; no difference measured on this project's CPU.
    channels_last: bool = Field(
        default=False,
        description="UNet and VAE in channels-last memory (often faster on GPUs in half precision)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the pipeline call")

    def problems(self, model: "ModelConfig") -> list[str]:
        if model.path:
            return []
        return [f"model.path: the {model.backend} backend needs a checkpoint (directory or hub id)"]


class DemoOptions(ResizingOptions):
    """`demo`: the shipped demo generalist (model.path: None) or a saved one."""

    def problems(self, model: "ModelConfig") -> list[str]:
        if isinstance(model.path, dict):
            return ["model.path: the demo backend serves every task from one checkpoint directory"]
        return []


class MarigoldOptions(DenoiserOptions):
    """`marigold`: Marigold depth / normals checkpoints through diffusers."""


class DiffusersOptions(DenoiserOptions):
    """`diffusers`: instruction-edit pipelines (FLUX.2 [klein], FLUX.1 Kontext, Qwen-Image-Edit)."""

    # How working sizes are chosen. `buckets`: the nearest (by aspect) of a small fixed set per
    # pipeline, so mixed-size photos share model calls; `exact`: each image's own aspect. Either
    # way the decode stage maps labels back to the input size (vb_batch.models.sizing).
    sizing: Literal["buckets", "exact"] = Field(
        default="buckets",
        description="buckets (a fixed set of working sizes by aspect: mixed sizes batch) | exact",
    )
    guidance_scale: float | None = Field(
        default=None, ge=0,
        description="guidance scale (None: the pipeline's default)",
    )
    # A fine-tuned transformer loaded over the base pipeline (Open Vision Banana's, over
    # FLUX.2 [klein] base): a directory or hub id, and the subfolder that holds it.
    transformer_path: str | None = Field(
        default=None,
        description="fine-tuned transformer over the base pipeline (directory or hub id)",
    )
    transformer_subfolder: str | None = Field(default=None, description="the folder of transformer_path that holds it")
    transformer_revision: str | None = Field(default=None, description="hub revision of transformer_path")
    vae_slicing: bool = Field(default=False, description="decode a batch one image at a time (memory)")
    vae_tiling: bool = Field(default=False, description="encode and decode large images in tiles (memory)")

    def problems(self, model: "ModelConfig") -> list[str]:
        if isinstance(model.path, dict):
            return ["model.path: the diffusers backend needs one checkpoint (a local directory or hub id)"]
        return super().problems(model)


# ---------------------------------------------------------------------------- remote models


class RemoteOptions(BackendOptions):
    """What every backend that calls a server shares: the key, timeouts, retries, concurrency."""

    token_env: str | None = Field(
        default=None, description="environment variable that holds the API token or key"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="connect / read timeout per request, seconds")
    max_retries: int = Field(
        default=4, ge=0,
        description="retries after the first attempt, on 429, 5xx and connection errors",
    )
    retry_backoff_s: float = Field(
        default=1.0, ge=0,
        description="first wait between retries, seconds; doubles per retry",
    )
    concurrency: int = Field(default=4, gt=0, description="requests in flight at once")


class HttpOptions(RemoteOptions):
    """`http`: a painter behind an HTTP endpoint; the token is sent as `<token_header>: <token_scheme> <token>`."""

    endpoint: str | None = Field(default=None, description="the URL images are POSTed to (required)")
    headers: dict[str, str] = Field(default_factory=dict, description="extra, non-secret headers")
    token_header: str = Field(default="Authorization", description="header the token is sent in")
    token_scheme: str | None = Field(default="Bearer", description="scheme before the token (None: the bare token)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields of each request")

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, endpoint):
        return http_url(endpoint, "http(s)://host[:port]/path", "put the token in model.token_env")

    @field_validator("headers")
    @classmethod
    def _no_credentials_in_headers(cls, headers):
        # The job config is stored in the output's metadata: secrets must stay in the environment.
        # Every header value is masked wherever the config is shown; a credential still does not
        # belong here. Values are never echoed.
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
            if any(ch in value for ch in "\r\n\0"):
                raise ValueError(f"the value of {name!r} holds a line break or NUL: one line of text per header")
            if any(ord(ch) > 255 for ch in value):
                raise ValueError(f"the value of {name!r} is not Latin-1 text, which is all an HTTP header carries")
            if any(word in name.lower() for word in _CREDENTIAL_HEADER_WORDS):
                raise ValueError(
                    f"{name!r} carries a credential: put it in the environment variable named by model.token_env "
                    f"(and set model.token_header: {name}, model.token_scheme: null if it takes the bare token)"
                )
        return headers

    def problems(self, model: "ModelConfig") -> list[str]:
        return [] if self.endpoint else ["model.endpoint: the http backend needs the URL to POST images to"]


class HostedOptions(RemoteOptions):
    """What the vendors' SDK backends share (gemini, openai): the model id, a base URL, a price."""

    # The vendor's model id, and the price the user fills in for the cost estimate printed
    # before a run. The API key is read from the environment variable named by `token_env`.
    model_name: str | None = Field(
        default=None,
        description="the hosted model's id, e.g. gemini-2.5-flash-image or gpt-image-1",
    )
    endpoint: str | None = Field(default=None, description="the API's base URL (None: the vendor's)")
    price_per_image: float | None = Field(
        default=None, ge=0,
        description="your price per answered image, for the cost estimate (None: token prices, if known)",
    )
    # Prices per million tokens over the model's in vb_batch.models.hosted_limits.MODEL_LIMITS: the
    # per-row cost (vb_usage), the run's total and the estimate before a run all use them.
    token_prices: dict[Literal["input", "output", "thoughts"], float] | None = Field(
        default=None,
        description="US$ per 1M tokens {input, output, thoughts} over the model table's (None: the table's)",
    )
    # One limiter per model and run (vb_batch.models.quota), shared by every thread, call and worker
    # (on Ray a named actor, on Spark a token server on the driver: vb_batch.models.quota_share).
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="most requests a minute over the run, spaced evenly (None: no limit)",
    )
    max_concurrent_requests: int | None = Field(
        default=None, gt=0,
        description="most requests in flight at once over the run (None: model.concurrency per worker)",
    )
    request_size: Literal["model", "input"] = Field(
        default="model",
        description="model: images resized (and padded to an aspect ratio) to what the model answers at; "
                    "input: sent at their own size (never over the inline limit)",
    )
    model_example: ClassVar[str] = "the vendor's model id"

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, endpoint):
        return http_url(endpoint, "http(s)://host[:port]/path", "put the key in model.token_env")

    def problems(self, model: "ModelConfig") -> list[str]:
        if self.model_name:
            return []
        return [f"model.model_name: the {model.backend} backend needs the model id, e.g. {self.model_example}"]


class OpenAIOptions(HostedOptions):
    """`openai`: OpenAI's image edits API through the official SDK."""

    options: dict[str, Any] = Field(default_factory=dict, description="images.edit arguments such as size, quality")
    model_example: ClassVar[str] = "gpt-image-1"


class GeminiOptions(HostedOptions):
    """`gemini`: Gemini image models through google-genai, online or by Batch API (Developer API or Vertex AI)."""

    options: dict[str, Any] = Field(
        default_factory=dict, description="generation config over the row's seed (temperature, image_config, ...)"
    )
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online (one request per image) or batch (the Batch API: asynchronous, half price)",
    )
    vertex: bool = Field(default=False, description="Vertex AI instead of the Gemini Developer API")
    project: str | None = Field(default=None, description="vertex: the Google Cloud project")
    location: str | None = Field(default=None, description="vertex: the Google Cloud location, e.g. global")
    batch_max_requests: int = Field(
        default=10_000, gt=0,
        description="batch: most requests in one batch job (model.batch_size rows are sent per job)",
    )
    batch_poll_s: float = Field(
        default=30.0, gt=0,
        description="batch: first wait between polls of a batch job, seconds; grows to 10x",
    )
    batch_timeout_s: float = Field(
        default=48 * 3600.0, gt=0,
        description="batch: how long to wait for a batch job before its rows get an error, seconds",
    )
    batch_jobs_in_flight: int = Field(
        default=4, gt=0,
        description="batch: most batch jobs submitted and polled at once (each of model.batch_size rows)",
    )
    batch_poll_retry_s: float = Field(
        default=900.0, gt=0,
        description="batch: how long a job's polls may keep failing (stalled, 5xx) before its rows get an error",
    )
    model_example: ClassVar[str] = "gemini-2.5-flash-image"

    def problems(self, model: "ModelConfig") -> list[str]:
        problems = super().problems(model)
        if self.mode == "batch" and self.vertex:
            problems.append("model.mode: the Vertex AI Batch API reads and writes Cloud Storage or BigQuery, "
                            "which vb_batch does not drive; use mode: online or the Gemini Developer API")
        return problems


# The built-in backends' options by backend class ("module:Class", as `models.base.BACKENDS`
# names them), so that validating a config imports no backend module.
BUILTIN_OPTIONS: dict[str, type[BackendOptions]] = {
    "vb_batch.models.identity:IdentityBackend": FreeFormOptions,
    "vb_batch.models.marigold:MarigoldBackend": MarigoldOptions,
    "vb_batch.models.diffusers_edit:DiffusersEditBackend": DiffusersOptions,
    "vb_batch.models.http:HttpBackend": HttpOptions,
    "vb_batch.models.gemini:GeminiBackend": GeminiOptions,
    "vb_batch.models.openai_images:OpenAIImagesBackend": OpenAIOptions,
    "vb_batch.models.demo_generalist:DemoBackend": DemoOptions,
}


def option_default(key: str) -> tuple[bool, Any]:
    """(True, the default) of a key some built-in backend declares; (False, None) for any other name.

    What `ModelConfig` answers when code reads a key the chosen backend does not use.
    """
    for options in (*BUILTIN_OPTIONS.values(), FreeFormOptions):
        info = options.model_fields.get(key)
        if info is not None:
            return True, info.get_default(call_default_factory=True)
    return False, None
