"""Typed job configuration: YAML file plus `a.b=value` overrides, validated by pydantic.

Every key a job understands is declared here with its default, so a typo or a
bad value fails before any image is read, with the field's dotted name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vb_batch.errors import ConfigError  # noqa: F401 - the config's own error, importable from here
from vb_batch.registry import check_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageOptions(_Section):
    """How to reach object storage for one URL (passed to fsspec / pyarrow)."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    profile: str | None = None
    # Transient faults (503 SlowDown, throttling, connection resets, timeouts) are retried with
    # exponential backoff by both clients, up to this many attempts per request.
    max_attempts: int = Field(default=10, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("endpoint_url")
    @classmethod
    def _plain_endpoint(cls, url):
        url = _http_url(url, "http(s)://host[:port], e.g. http://127.0.0.1:9000",
                        "use storage.profile, the AWS_* environment or storage.options key/secret")
        if url is not None and (urlsplit(url).query or urlsplit(url).fragment):
            raise ValueError("must not carry a query string or fragment: an object-store endpoint takes none")
        return url


def _http_url(url: str | None, example: str, credentials_hint: str) -> str | None:
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


def _check_catalog(catalog: dict[str, Any], field: str) -> dict[str, Any]:
    # The job config is stored with the output: a catalog password belongs in the environment.
    for key, value in catalog.items():
        if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                f"{field}.{key}: must not carry credentials (user:password@); set them in the environment, "
                f"e.g. PYICEBERG_CATALOG__<NAME>__{key.upper().replace('.', '_').replace('-', '_')}"
            )
    return catalog


# Pillow formats vb_batch decodes by default, and those it can decode at all: formats whose pixel
# count it checks on the header before Pillow allocates pixels (see vb_batch.io.images).
DEFAULT_IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF")
DECODABLE_IMAGE_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF", "ICO", "CUR", "QOI", "DDS", "PSD", "TGA", "PPM"}
)


class InputConfig(_Section):
    # A Parquet file or dataset, a folder / prefix of images, or a Delta table (its URI).
    path: str = ""
    format: Literal["auto", "parquet", "images", "delta", "iceberg"] = "auto"
    # iceberg: the table ("namespace.name") and its catalog: properties for pyiceberg's
    # `load_catalog` ({name: ...} alone picks a catalog from ~/.pyiceberg.yaml or the environment).
    table: str | None = None
    catalog: dict[str, Any] = Field(default_factory=dict)
    # Only the rows that match, e.g. "day = '2026-11-01' and camera in ('a', 'b')": pyiceberg's
    # row-filter syntax for every input format; pushed down to partitions, files and row groups.
    filter: str | None = None
    image_column: str | None = None
    uri_column: str | None = None
    id_column: str = "id"
    # Hard limit per image; larger images are a per-row error (decompression bombs), checked on
    # the image header before any pixel is decoded.
    max_pixels: int = Field(default=64_000_000, gt=0)
    # Hard limit on the encoded bytes of one image (an image cell, or a URI fetch, enforced while
    # streaming); larger is a per-row `too_large`. The default fits a 64 MP uncompressed RGB TIFF.
    max_bytes: int = Field(default=200_000_000, gt=0)
    # Image formats (Pillow's names) that may be decoded; anything else is a per-row error.
    image_formats: list[str] = Field(default_factory=lambda: list(DEFAULT_IMAGE_FORMATS))
    min_side: int = Field(default=8, gt=0)
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"]
    )
    # URI columns may only name objects under these prefixes (None: the input's own scheme).
    allowed_prefixes: list[str] | None = None
    # http(s) URIs that resolve to loopback / private / link-local addresses are refused unless set.
    allow_private_addresses: bool = False
    storage: StorageOptions = Field(default_factory=StorageOptions)
    read_batch_rows: int = Field(default=256, gt=0)

    @field_validator("image_formats")
    @classmethod
    def _decodable_formats(cls, formats):
        formats = [f.upper() for f in formats]
        unknown = [f for f in formats if f not in DECODABLE_IMAGE_FORMATS]
        if unknown:
            hint = " (JPEG is spelt JPEG)" if "JPG" in unknown else ""
            raise ValueError(f"{unknown} cannot be decoded safely{hint}; choose from {sorted(DECODABLE_IMAGE_FORMATS)}")
        return formats

    @model_validator(mode="after")
    def _one_image_source(self) -> "InputConfig":
        if self.image_column and self.uri_column:
            raise ValueError("set input.image_column or input.uri_column, not both")
        if self.format == "iceberg":
            if not self.table:
                raise ValueError('input.table: required with input.format: iceberg ("namespace.name")')
        elif not self.path:
            raise ValueError("input.path: required (a Parquet file or dataset, a folder of images or a Delta table)")
        if self.format != "iceberg" and (self.table or self.catalog):
            raise ValueError("input.table and input.catalog: only for input.format: iceberg")
        _check_catalog(self.catalog, "input.catalog")
        if self.filter is not None:
            from vb_batch.io.filters import parse_filter  # pyiceberg's parser: bad syntax fails here, not mid-run

            parse_filter(self.filter, "input.filter")
        return self


class OutputConfig(_Section):
    # parquet: the dataset's directory / prefix; delta: the table's URI; iceberg: none (the table
    # lives where its catalog puts it; staging, run records and the report go under its location).
    path: str = "out"
    format: Literal["parquet", "delta", "iceberg"] = "parquet"
    # iceberg: the table ("namespace.name", created when missing) and its catalog (as input.catalog).
    table: str | None = None
    catalog: dict[str, Any] = Field(default_factory=dict)
    # delta / iceberg: input columns to partition the table by (identity partitions).
    partition_by: list[str] = Field(default_factory=list)
    mode: Literal["error", "overwrite", "append", "resume"] = "error"
    encoding: Literal["png", "array"] = "png"
    prefix: str = ""
    rows_per_file: int = Field(default=1024, gt=0)
    # Rows staged before a commit makes them visible (0: one commit at the end).
    commit_every: int = Field(default=4096, ge=0)
    compression: str = "zstd"
    keep_image: bool = True
    # Write the HTML run report (<output.path>/_report.html) after the run.
    report: bool = True
    report_samples: int = Field(default=12, ge=0)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    # overwrite / append / resume refuse a folder that holds files vb_batch did not write for this
    # output (another dataset's part files, anything else); set to true to write next to them anyway.
    # vb_batch then still deletes or moves only files its own records name.
    allow_foreign_files: bool = False
    # One writer per output: a lease under `_vb/`, renewed every lease_seconds / 3 while the run
    # lives; a lease not renewed for lease_seconds is stale (its holder died) and is taken over.
    lease_seconds: float = Field(default=120.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_path_for_iceberg(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "iceberg":
            if data.get("path"):
                raise ValueError("output.path: not used with output.format: iceberg (its catalog places the table); remove it")
            data = {**data, "path": ""}
        return data

    @model_validator(mode="after")
    def _format_keys(self) -> "OutputConfig":
        if self.format == "iceberg" and not self.table:
            raise ValueError('output.table: required with output.format: iceberg ("namespace.name")')
        if self.format != "iceberg" and (self.table or self.catalog):
            raise ValueError("output.table and output.catalog: only for output.format: iceberg")
        if self.partition_by and self.format == "parquet":
            raise ValueError("output.partition_by: only for output.format delta or iceberg")
        _check_catalog(self.catalog, "output.catalog")
        return self

    @property
    def name(self) -> str:
        """The output as a person names it: its path, or its Iceberg table."""
        return f"iceberg table {self.table}" if self.format == "iceberg" else self.path


class DepthConfig(_Section):
    preset: str | dict[str, Any] | None = None  # None: the model profile's preset


class NormalsConfig(_Section):
    frame: Literal["opengl", "opencv"] = "opengl"


class SegmentationConfig(_Section):
    classes: list[str] | None = None
    legend: dict[str, tuple[int, int, int]] | None = None
    palette: Literal["generated", "cityscapes"] = "generated"
    max_distance: float | None = Field(default=None, gt=0)
    ensemble: int = Field(default=1, ge=1, le=16)

    @field_validator("legend")
    @classmethod
    def _rgb_range(cls, legend):
        for name, rgb in (legend or {}).items():
            if any(not 0 <= c <= 255 for c in rgb):
                raise ValueError(f"colour of class {name!r} must be three integers in 0..255, got {list(rgb)}")
        return legend

    @model_validator(mode="after")
    def _classes_or_legend(self) -> "SegmentationConfig":
        if self.classes and self.legend:
            raise ValueError("set segmentation.classes or segmentation.legend, not both")
        return self


class ReferringConfig(_Section):
    phrase: str | None = None
    phrase_column: str | None = None


# torch device strings: a type and an optional index (cuda:1).
_TORCH_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|xla|mtia|meta)(?::(\d+))?")
_TORCH_DEVICE_TYPO = re.compile(r"(cpu|cuda|mps|xpu|gpu)\s*[:_-]?\s*(\d*)")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CREDENTIAL_HEADER_WORDS = ("auth", "token", "key", "secret", "password", "cookie", "credential")


def _device_hint(device: str) -> str:
    """ "did you mean 'cuda:1'? " for near misses such as gpu, GPU:1, cuda1; else ""."""
    near = _TORCH_DEVICE_TYPO.fullmatch(device.strip().lower())
    if not near:
        return ""
    kind = "cuda" if near[1] == "gpu" else near[1]
    return f"did you mean {kind + (':' + near[2] if near[2] else '')!r}? "


class ModelConfig(_Section):
    # Required: identity (codec debugging: the input image is the "painting"), marigold, diffusers,
    # http, demo, or package.module:Class. No default: a job without a model must not write labels.
    backend: str | None = None
    # A checkpoint (local directory or hub id), or one per task: {depth: ..., normals: ...}.
    path: str | dict[str, str] | None = None
    revision: str | None = None
    profile: str | None = None  # None: the backend's default profile
    batch_size: int = Field(default=8, gt=0)
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    num_inference_steps: int | None = Field(default=None, gt=0)
    # The model's working size: Marigold's longer side; the diffusers edit pipelines' side of the
    # equal-area square (None: 1024, about 1 megapixel). 0: the input's own size.
    processing_resolution: int | None = Field(default=None, ge=0)
    # diffusers: the pipeline's own guidance knob (None: the pipeline's default).
    guidance_scale: float | None = Field(default=None, ge=0)
    # diffusers: a fine-tuned transformer loaded over the base pipeline (Open Vision Banana's,
    # over FLUX.2 [klein] base): a directory or hub id, and the subfolder that holds it.
    transformer_path: str | None = None
    transformer_subfolder: str | None = None
    transformer_revision: str | None = None
    compile: bool = False  # diffusers, marigold: torch.compile the denoiser (transformer or UNet)
    # diffusers, marigold: UNet and VAE in channels-last memory (the same maps). Often faster for
    # convolutions on GPUs in half precision; no difference measured on this project's CPU.
    channels_last: bool = False
    # Decode painted answers with the codecs' torch path on the model's device, in the model worker,
    # batched, instead of with numpy on CPU threads after it: for hosts short of CPU per GPU.
    decode_on_device: bool = False
    vae_slicing: bool = False  # diffusers: decode a batch one image at a time (memory)
    vae_tiling: bool = False  # diffusers: encode and decode large images in tiles (memory)
    # http: the URL images are POSTed to, extra (non-secret) headers, and the environment variable
    # that holds the API token, sent as `<token_header>: <token_scheme> <token>`.
    endpoint: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    token_env: str | None = None
    token_header: str = "Authorization"
    token_scheme: str | None = "Bearer"
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0)  # after the first attempt, on 429, 5xx and connection errors
    retry_backoff_s: float = Field(default=1.0, ge=0)  # first wait; doubles per retry
    concurrency: int = Field(default=4, gt=0)  # requests in flight at once
    # Extra keyword arguments for the pipeline call (diffusers) or extra JSON fields (http).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _torch_device(cls, device):
        # Syntax only: whether the device exists is known where the model loads (a Ray or Spark
        # driver may have no GPU while its workers do); `models.loading.resolve_device` checks that.
        if device == "auto" or _TORCH_DEVICE.fullmatch(device):
            return device
        raise ValueError(f"{device!r} is not a torch device; {_device_hint(device)}use auto, cpu, cuda, cuda:N, mps or xpu")

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, endpoint):
        return _http_url(endpoint, "http(s)://host[:port]/path", "put the token in model.token_env")

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


class EngineConfig(_Section):
    # local | ray | spark, or any engine registered with `vb_batch.engines.register_engine`.
    kind: str = "local"
    # Threads that fetch + decode images and encode outputs around the model.
    io_threads: int | None = Field(default=None, gt=0)  # None: one per CPU less one, at most 4
    # Model batches prepared ahead of the model so it never waits for decode.
    prefetch_batches: int = Field(default=2, ge=1)
    # ray: the cluster (None: RAY_ADDRESS if set, else a local Ray started for the job;
    # "auto": the running cluster; "ray://head:10001": a remote one through Ray Client).
    address: str | None = None
    # ray: model actors, a fixed count or [min, max] to autoscale between.
    actors: int | tuple[int, int] = 1
    gpus_per_actor: float = Field(default=0, ge=0)
    cpus_per_actor: float = Field(default=1, ge=0)
    # ray, spark: the most rows in one unit of work (a task): larger row groups are split, so a
    # task's memory and time are bounded whatever the input's row-group size.
    unit_rows: int = Field(default=4096, gt=0)
    # ray: CPU tasks (fetch + decode before the model, decode + encode + write after it).
    cpus_per_task: float = Field(default=1, gt=0)
    cpu_batch_rows: int = Field(default=64, gt=0)
    # ray: the most decoded image bytes one prepare block holds (large photos: fewer rows per block).
    block_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    # ray: batches queued on each actor while it runs one (None: prefetch_batches).
    max_tasks_in_flight_per_actor: int | None = Field(default=None, ge=1)
    # spark: master URL (None: local[*]; local-cluster[2,1,1024], spark://..., yarn), extra Spark
    # conf, rows per Arrow batch handed to Python workers, units per Spark job (a wave; None: four times the
    # cluster's cores; two waves run at once), GPUs per task.
    master: str | None = None
    spark_conf: dict[str, str] = Field(default_factory=dict)
    arrow_batch_rows: int = Field(default=64, gt=0)
    partitions: int | None = Field(default=None, gt=0)
    gpus_per_task: float = Field(default=0, ge=0)

    @field_validator("kind")
    @classmethod
    def _known_engine(cls, kind):
        check_name("engine.kind", kind)  # the engine registry: engines users registered count too
        return kind

    @field_validator("actors")
    @classmethod
    def _actor_range(cls, actors):
        low, high = (actors, actors) if isinstance(actors, int) else actors
        if low < 1 or high < low:
            shown = actors if isinstance(actors, int) else list(actors)
            raise ValueError(f"give a count >= 1 or [min, max] with 1 <= min <= max, got {shown}")
        return actors


class RunConfig(_Section):
    name: str = "vb-batch"
    progress: bool = True
    # Above this fraction of failed rows the run fails (exit 1), after committing every row.
    max_error_fraction: float = Field(default=0.5, ge=0, le=1)
    # With output.mode: resume, also re-run the rows whose vb_error is set; each result replaces
    # the row's previous one, so every id stays exactly once.
    retry_failed: bool = False


class JobConfig(_Section):
    input: InputConfig
    output: OutputConfig = Field(default_factory=OutputConfig)
    tasks: list[str] = Field(default_factory=lambda: ["depth"], min_length=1)
    depth: DepthConfig = Field(default_factory=DepthConfig)
    normals: NormalsConfig = Field(default_factory=NormalsConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    referring: ReferringConfig = Field(default_factory=ReferringConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            check_name("tasks", task)  # the task registry is the one list of names
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task listed twice in {tasks}")
        return tasks

    @model_validator(mode="after")
    def _task_inputs(self) -> "JobConfig":
        if not self.model.backend:
            raise ValueError(
                "model.backend: required, e.g. marigold (with model.path), diffusers, http, demo, or identity to "
                "decode the input images themselves as paintings (codec debugging)"
            )
        if "segmentation" in self.tasks and not (self.segmentation.classes or self.segmentation.legend):
            raise ValueError("task 'segmentation' needs segmentation.classes or segmentation.legend")
        if "referring" in self.tasks and not (self.referring.phrase or self.referring.phrase_column):
            raise ValueError("task 'referring' needs referring.phrase or referring.phrase_column")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3, true, [x, y] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:-1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not field:  # a check across sections names its own fields
            lines.append(f"  {msg}")
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `vb-batch run --help`)"
        lines.append(f"  {field}: {msg}")
    return "invalid job config:\n" + "\n".join(lines)


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a validated `JobConfig` from a YAML path (or dict) and `a.b=value` overrides.

    >>> cfg = load_config({"input": {"path": "images/"}}, ["model.batch_size=4"])
    >>> cfg.model.batch_size
    4
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def redacted(cfg: JobConfig) -> dict[str, Any]:
    """The config as a plain dict with its secrets masked: what logs, `validate`, `vb.job` and run records show.

    Masked (see `vb_batch.masking.redact`): values of secret-looking keys (secret, token,
    password, key, credential), every `model.headers` value, and the userinfo, query string
    and fragment of every URL (model.endpoint, storage endpoints, catalog URIs, paths, prefixes).
    """
    from vb_batch.masking import redact

    return redact(cfg.model_dump(mode="json"))
