"""Typed job configuration: YAML file plus `a.b=value` overrides, validated by pydantic.

Every key a job understands is declared with its default, so a typo or a bad
value fails before any image is read, with the field's dotted name; `load_config`
and `config_problems` list every problem at once, one `field: what is wrong` line each.

The `model:` section is one flat mapping: the keys every backend shares are
declared on `ModelConfig`; each backend declares its own (`vb_batch.models.options`,
one pydantic model per backend), and a key the chosen backend does not use is an
error naming the backends that do.

Length: over half of this module is declarations (each key's type, default,
description and why, from which docs/config.md and `run --help` are generated);
the sections are the job's one contract and read best side by side. The logic
(checks across keys, overrides, the every-problem listing) is about 250 lines.
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
from vb_batch.models.options import UNKNOWN_KEY, BackendOptions, http_url, option_default
from vb_batch.registry import check_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageOptions(_Section):
    """How to reach object storage for one URL (passed to fsspec / pyarrow)."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, http(s)://host[:port] (None: AWS's own)",
    )
    region: str | None = Field(default=None, description="bucket region (None: the client's default chain)")
    anonymous: bool = Field(default=False, description="unsigned requests (public buckets)")
    profile: str | None = Field(
        default=None,
        description="named AWS profile for credentials (None: AWS_* environment or default chain)",
    )
    # Transient faults (503 SlowDown, throttling, connection resets, timeouts) are retried with
    # exponential backoff by both clients, up to this many attempts per request.
    max_attempts: int = Field(
        default=10, ge=1,
        description="attempts per request; transient faults (503, throttling, resets, timeouts) are retried with backoff",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="connect / read timeout per request, seconds")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra fsspec / pyarrow filesystem options, passed through",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _plain_endpoint(cls, url):
        url = http_url(url, "http(s)://host[:port], e.g. http://127.0.0.1:9000",
                        "use storage.profile, the AWS_* environment or storage.options key/secret")
        if url is not None and (urlsplit(url).query or urlsplit(url).fragment):
            raise ValueError("must not carry a query string or fragment: an object-store endpoint takes none")
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
    path: str = Field(
        default="",
        description="Parquet file or dataset, folder / prefix of images, or Delta table (local path or URL such as s3://...)",
    )
    format: Literal["auto", "parquet", "images", "delta", "iceberg"] = Field(
        default="auto",
        description="input format (auto: detected from the path)",
    )
    # iceberg: the table ("namespace.name") and its catalog: properties for pyiceberg's
    # `load_catalog` ({name: ...} alone picks a catalog from ~/.pyiceberg.yaml or the environment).
    table: str | None = Field(default=None, description="iceberg: the table, \"namespace.name\"")
    catalog: dict[str, Any] = Field(
        default_factory=dict,
        description="iceberg: pyiceberg load_catalog properties ({name: ...} picks one from ~/.pyiceberg.yaml)",
    )
    # Only the rows that match, e.g. "day = '2026-11-01' and camera in ('a', 'b')": pyiceberg's
    # row-filter syntax for every input format; pushed down to partitions, files and row groups.
    filter: str | None = Field(
        default=None,
        description="row filter, e.g. \"day = '2026-11-01' and camera in ('a', 'b')\" (pyiceberg syntax, pushed down)",
    )
    image_column: str | None = Field(default=None, description="column of image bytes (None: detected)")
    uri_column: str | None = Field(default=None, description="column of image URIs, instead of image_column")
    id_column: str = Field(default="id", description="row id column (missing: the URI or the sha256 of the bytes)")
    # Rows sharing an id (a repeated id, or identical images without an id column, whose ids are the
    # SHA-256 of their bytes) break exactly-once: refused before any row runs, unless a policy says
    # which rows to keep. first: the first row of each id (input order) is labelled, the others are
    # skipped (counted, warned about with code duplicate_id); position: ids vb_batch derives (URI or
    # SHA-256) also carry the row's place, "<id>@<file>#<row>", so every row is kept (not for an id column).
    duplicate_ids: Literal["error", "first", "position"] = Field(
        default="error",
        description="rows sharing an id: error (refuse the run), first (keep the first of each), "
                    "position (derived ids carry the row's file and row; keeps every row)",
    )
    # Hard limit per image; larger images are a per-row error (decompression bombs), checked on
    # the image header before any pixel is decoded.
    max_pixels: int = Field(
        default=64_000_000, gt=0,
        description="largest image in pixels, checked on the header; larger is a per-row error",
    )
    # Hard limit on the encoded bytes of one image (an image cell, or a URI fetch, enforced while
    # streaming); larger is a per-row `too_large`. The default fits a 64 MP uncompressed RGB TIFF.
    max_bytes: int = Field(
        default=200_000_000, gt=0,
        description="largest encoded image in bytes; larger is a per-row too_large",
    )
    # Image formats (Pillow's names) that may be decoded; anything else is a per-row error.
    image_formats: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_FORMATS),
        description="image formats (Pillow names) that may be decoded; others are a per-row error",
    )
    min_side: int = Field(default=8, gt=0, description="smallest image side in pixels; smaller is a per-row error")
    # Bounded work per row: the CPU seconds one image's decode may take (checked while its bytes are
    # fed to the decoder), and the scans a JPEG may have (counted before decoding: progressive JPEGs
    # have about 10; each scan is a pass over the image). Over either: a per-row `decode_timeout`.
    decode_timeout_s: float = Field(
        default=20.0, gt=0,
        description="CPU seconds one image may take to decode; longer is a per-row decode_timeout",
    )
    max_jpeg_scans: int = Field(
        default=100, gt=0,
        description="most scans a JPEG may have (progressive: ~10); more is a per-row decode_timeout",
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"],
        description="file extensions read from an image folder",
    )
    # URI columns may only name objects under these prefixes (None: the input's own scheme).
    allowed_prefixes: list[str] | None = Field(
        default=None,
        description="where URIs may point (None: the input's own scheme)",
    )
    # http(s) URIs that resolve to loopback / private / link-local addresses are refused unless set.
    allow_private_addresses: bool = Field(
        default=False,
        description="also fetch http(s) URIs on loopback, private or link-local hosts",
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="how to reach the input's object storage (see storage.*)",
    )
    read_batch_rows: int = Field(default=256, gt=0, description="rows per batch read from the input")

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
    path: str = Field(
        default="out",
        description="output dataset or Delta table (local path or URL); not used for iceberg",
    )
    format: Literal["parquet", "delta", "iceberg"] = Field(default="parquet", description="output format")
    # iceberg: the table ("namespace.name", created when missing) and its catalog (as input.catalog).
    table: str | None = Field(default=None, description="iceberg: the table, \"namespace.name\" (created when missing)")
    catalog: dict[str, Any] = Field(
        default_factory=dict,
        description="iceberg: pyiceberg load_catalog properties, as input.catalog",
    )
    # delta / iceberg: input columns to partition the table by (identity partitions).
    partition_by: list[str] = Field(
        default_factory=list,
        description="delta / iceberg: input columns to partition the table by",
    )
    mode: Literal["error", "overwrite", "append", "resume"] = Field(
        default="error",
        description="error: refuse existing data; overwrite; append; resume: skip ids already committed",
    )
    encoding: Literal["png", "array"] = Field(
        default="png",
        description="png: lossless, viewable; array: raw little-endian values",
    )
    prefix: str = Field(
        default="",
        description="prefix of the output columns, e.g. vb_ (for inputs that already have depth, ...)",
    )
    rows_per_file: int = Field(default=1024, gt=0, description="rows per output part file")
    # Rows staged before a commit makes them visible (0: one commit at the end).
    commit_every: int = Field(
        default=4096, ge=0,
        description="rows staged before a commit makes them visible (0: one commit at the end)",
    )
    # Seconds at most between commits while rows are written, whatever commit_every says: a kill -9
    # loses at most about this much work (plus a batch). Files cut short by it are shorter than
    # rows_per_file. 0: rows only.
    commit_every_s: float = Field(
        default=60.0, ge=0,
        description="seconds at most between commits while rows are written: what a kill can lose (0: rows only)",
    )
    compression: str = Field(default="zstd", description="Parquet compression codec")
    # The grid maps are stored at: the whole image's, or the one the model answered at (e.g. 768 px
    # for a 12 MP photo), either capped by max_side. Summary scalars come from the model's grid either way.
    resolution: Literal["input", "working"] = Field(
        default="input",
        description="grid of the stored maps: input (the image's size) or working (the model's answer size)",
    )
    max_side: int | None = Field(
        default=None, gt=0,
        description="cap the stored maps' longer side at this many pixels (aspect kept, never enlarged)",
    )
    # zlib level of PNG maps: 1 is several times faster than 6 for a few percent more bytes.
    png_compression: int = Field(
        default=1, ge=0, le=9,
        description="zlib level of png maps, 0 (none, fastest, largest) to 9 (smallest, slowest)",
    )
    keep_image: bool = Field(default=True, description="keep the input image column in the output")
    # Write the HTML run report (<output.path>/_report.html) after the run.
    report: bool = Field(default=True, description="write the HTML run report <output.path>/_report.html after the run")
    report_samples: int = Field(default=12, ge=0, description="rows shown in the report's sample grid")
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="how to reach the output's object storage (see storage.*)",
    )
    # overwrite / append / resume refuse a folder that holds files vb_batch did not write for this
    # output (another dataset's part files, anything else); set to true to write next to them anyway.
    # vb_batch then still deletes or moves only files its own records name.
    allow_foreign_files: bool = Field(
        default=False,
        description="write into a folder that holds files vb_batch did not write (it never touches them)",
    )
    # One writer per output: a lease under `_vb/`, renewed every lease_seconds / 3 while the run
    # lives; a lease not renewed for lease_seconds is stale (its holder died) and is taken over.
    lease_seconds: float = Field(
        default=120.0, gt=0,
        description="one writer per output: a lease not renewed for this long is taken over",
    )

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
    preset: str | dict[str, Any] | None = Field(
        default=None,
        description="depth codec preset name or parameters (None: the model profile's preset)",
    )  # None: the model profile's preset


class NormalsConfig(_Section):
    frame: Literal["opengl", "opencv"] = Field(
        default="opengl",
        description="camera frame of the stored normals: opengl (x right, y up, z to viewer) or opencv",
    )


class SegmentationConfig(_Section):
    classes: list[str] | None = Field(default=None, description="class names; colours from the palette")
    legend: dict[str, tuple[int, int, int]] | None = Field(
        default=None,
        description="class colours {name: [r, g, b]}, instead of classes",
    )
    palette: Literal["generated", "cityscapes"] = Field(
        default="generated",
        description="colours for segmentation.classes: generated (maximal separation) or cityscapes",
    )
    max_distance: float | None = Field(
        default=None, gt=0,
        description="RGB distance beyond which a pixel is unlabelled (None: the codec's default)",
    )
    ensemble: int = Field(default=1, ge=1, le=16, description="passes with permuted legends, per-pixel majority vote")
    # How class pixel fractions are stored: `list` list<struct<name, fraction>> (the default, as before),
    # `columns` one float32 column `segmentation_frac_<class>` per class, `map` map<string, float32>.
    # `columns` and `map` are queried without lambdas (DuckDB, Polars, Spark SQL).
    fractions: Literal["list", "columns", "map"] = Field(
        default="list",
        description="class pixel fractions as list<struct<name, fraction>>, one column per class, or a map",
    )

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
        if self.fractions == "columns":
            from vb_batch.tasks import fraction_column_clashes

            clashes = fraction_column_clashes(list(self.classes or self.legend or []))
            if clashes:
                raise ValueError(
                    f"fractions: columns: class names {'; '.join(clashes)} give no column name or the same one "
                    "(segmentation_frac_<name>, lower case, other characters as _); rename them or use fractions: map"
                )
        return self


class ReferringConfig(_Section):
    phrase: str | None = Field(default=None, description="what to segment for the referring task")
    phrase_column: str | None = Field(default=None, description="column holding a phrase per row, instead of phrase")


# torch device strings: a type and an optional index (cuda:1).
_TORCH_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|xla|mtia|meta)(?::(\d+))?")
_TORCH_DEVICE_TYPO = re.compile(r"(cpu|cuda|mps|xpu|gpu)\s*[:_-]?\s*(\d*)")


def _device_hint(device: str) -> str:
    """ "did you mean 'cuda:1'? " for near misses such as gpu, GPU:1, cuda1; else ""."""
    near = _TORCH_DEVICE_TYPO.fullmatch(device.strip().lower())
    if not near:
        return ""
    kind = "cuda" if near[1] == "gpu" else near[1]
    return f"did you mean {kind + (':' + near[2] if near[2] else '')!r}? "


class ModelConfig(_Section):
    """The `model:` section: the keys every backend shares, declared here; the chosen backend's own keys beside them.

    The section stays one flat mapping. A key that is not declared here belongs to the
    backend (`ModelBackend.options_model`, see `vb_batch.models.options`): it is validated by
    the backend's options model, and a key the backend does not use is an error naming
    the backends that do. The backend's keys (with their defaults) are read as attributes
    (`cfg.model.endpoint`) and dumped flat with the common ones. Reading a key that the
    chosen backend does not use gives the default its built-in declaration has (None for
    `processing_resolution`), so code that reads such a key for every backend keeps working;
    setting one is an error.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # Required: identity (codec debugging: the input image is the "painting"), marigold, diffusers,
    # http, demo, or package.module:Class. No default: a job without a model must not write labels.
    backend: str | None = Field(
        default=None,
        description="identity | marigold | diffusers | http | gemini | openai | demo | package.module:Class (required)",
    )
    # A checkpoint (local directory or hub id), or one per task: {depth: ..., normals: ...}.
    path: str | dict[str, str] | None = Field(
        default=None,
        description="checkpoint directory or hub id, or one per task {depth: ..., normals: ...}",
    )
    revision: str | None = Field(default=None, description="hub revision (commit) of model.path")
    profile: str | None = Field(
        default=None,
        description="prompts and codec presets: vision-banana | open-vision-banana | marigold (None: the backend's)",
    )  # None: the backend's default profile
    batch_size: int = Field(default=8, gt=0, description="images per model call")
    # Rows of one working size (the backend's batch_key) share calls across input batches: a row
    # waits for others of its size until a call is full or more than this many rows wait.
    group_window: int | None = Field(
        default=None, ge=0,
        description="rows that may wait for others of their working size to fill a model call "
        "(None: 4 x batch_size; 0: each batch's rows as they come)",
    )
    device: str = Field(
        default="auto",
        description="auto | cpu | cuda | cuda:N | mps | xpu (auto: cuda when available)",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="model weights' dtype (float16 / bfloat16 on GPUs)",
    )
    seed: int = Field(default=0, description="seed; per-row seeds derive from it, so labels do not depend on batching")
    # Decode painted answers with the codecs' torch path on the model's device, in the model worker,
    # batched, instead of with numpy on CPU threads after it: for hosts short of CPU per GPU.
    decode_on_device: bool = Field(
        default=False,
        description="decode paintings with torch on the model's device, in the model worker",
    )
    # Prompt templates per task over the profile's ({"depth": "...", "segmentation": "... {legend}"}).
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="prompt template per task, over the profile's (segmentation keeps {legend}, referring {phrase})",
    )
    # Set by vb_batch from output.path (<output>/_vb/hosted) for backends that keep records of
    # their remote jobs there (gemini batch), with the output's storage options.
    state_url: str | None = Field(
        default=None,
        description="where a backend records its remote jobs (set by vb_batch: <output>/_vb/hosted)",
    )
    state_storage: StorageOptions | None = Field(
        default=None, description="how to reach state_url (set by vb_batch: output.storage)"
    )

    @field_validator("device")
    @classmethod
    def _torch_device(cls, device):
        # Syntax only: whether the device exists is known where the model loads (a Ray or Spark
        # driver may have no GPU while its workers do); `models.loading.resolve_device` checks that.
        if device == "auto" or _TORCH_DEVICE.fullmatch(device):
            return device
        raise ValueError(f"{device!r} is not a torch device; {_device_hint(device)}use auto, cpu, cuda, cuda:N, mps or xpu")

    @model_validator(mode="after")
    def _backend_options(self) -> "ModelConfig":
        # The backend's keys, validated by its options model (defaults filled in); a key it does not
        # use is an error of that key (`model.<key>`), as pydantic reports the common keys' errors.
        from vb_batch.models.base import backend_option_values

        self.__pydantic_extra__ = backend_option_values(self.backend, self.__pydantic_extra__ or {})
        return self

    @property
    def backend_options(self) -> BackendOptions:
        """The chosen backend's own keys as its options model (`ModelBackend.options_model`)."""
        from vb_batch.models.base import options_model

        return options_model(self.backend).model_validate(self.__pydantic_extra__ or {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).model_fields or name.startswith("_"):
            super().__setattr__(name, value)
            return
        # pydantic stores an extra key unchecked: the backend's options model checks it first.
        from vb_batch.models.base import backend_option_values

        self.__pydantic_extra__ = backend_option_values(self.backend, {**(self.__pydantic_extra__ or {}), name: value})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            found, default = option_default(name)
            if not found:
                raise
            return default


class EngineConfig(_Section):
    # local | ray | spark, or any engine registered with `vb_batch.engines.register_engine`.
    kind: str = Field(
        default="local",
        description="local | ray | spark (or an engine registered with vb_batch.engines.register_engine)",
    )
    # Threads that fetch + decode images and encode outputs around the model.
    io_threads: int | None = Field(
        default=None, gt=0,
        description="threads that fetch, decode and encode around the model (None: CPUs - 1, at most 4)",
    )  # None: one per CPU less one, at most 4
    # Model batches prepared ahead of the model so it never waits for decode.
    prefetch_batches: int = Field(default=2, ge=1, description="model batches prepared ahead of the model")
    # ray: the cluster (None: RAY_ADDRESS if set, else a private local Ray started for the job, never
    # one that merely runs on the host; "auto": the running cluster; "local": private even with
    # RAY_ADDRESS; "host:port" or "ray://head:10001": that one). See engines.ray.ray_init_args.
    address: str | None = Field(
        default=None,
        description="ray: the cluster (None: RAY_ADDRESS if set, else a private local Ray; auto: the one "
                    "running here; local; host:port; ray://head:10001)",
    )
    # ray: model actors, a fixed count or [min, max] to autoscale between.
    actors: int | tuple[int, int] = Field(
        default=1,
        description="ray: model actors, a count or [min, max] to autoscale",
    )
    gpus_per_actor: float = Field(default=0, ge=0, description="ray: GPUs per model actor")
    cpus_per_actor: float = Field(default=1, ge=0, description="ray: CPUs per model actor")
    # ray, spark: the most rows in one unit of work (a task): larger row groups are split, so a
    # task's memory and time are bounded whatever the input's row-group size.
    unit_rows: int = Field(
        default=4096, gt=0,
        description="ray, spark: most rows in one unit of work (larger row groups are split)",
    )
    # ray: CPU tasks (fetch + decode before the model, decode + encode + write after it).
    cpus_per_task: float = Field(default=1, gt=0, description="ray: CPUs per fetch/decode and encode/write task")
    cpu_batch_rows: int = Field(default=64, gt=0, description="ray: rows per CPU task batch")
    # ray: the most decoded image bytes one prepare block holds (large photos: fewer rows per block).
    block_bytes: int = Field(
        default=128 * 1024 * 1024, gt=0,
        description="ray: most decoded image bytes in one prepare block",
    )
    # ray: batches queued on each actor while it runs one (None: prefetch_batches).
    max_tasks_in_flight_per_actor: int | None = Field(
        default=None, ge=1,
        description="ray: batches queued on each actor (None: prefetch_batches)",
    )
    # spark: master URL (None: local[*]; local-cluster[2,1,1024], spark://..., yarn), extra Spark
    # conf, rows per Arrow batch handed to Python workers, units per Spark job (a wave; None: four times the
    # cluster's cores; two waves run at once), GPUs per task.
    master: str | None = Field(
        default=None,
        description="spark: master URL (None: local[*]; local-cluster[...], spark://..., yarn)",
    )
    spark_conf: dict[str, str] = Field(default_factory=dict, description="spark: extra Spark conf")
    arrow_batch_rows: int = Field(default=64, gt=0, description="spark: rows per Arrow batch handed to Python workers")
    partitions: int | None = Field(
        default=None, gt=0,
        description="spark: units per Spark job (None: four times the cluster's cores)",
    )
    gpus_per_task: float = Field(default=0, ge=0, description="spark: GPUs per task")

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
    name: str = Field(default="vb-batch", description="the job's name")
    progress: bool = Field(default=True, description="show a progress bar")
    # Above this fraction of failed rows the run fails (exit 1), after committing every row.
    max_error_fraction: float = Field(
        default=0.5, ge=0, le=1,
        description="fail the run (exit 1) above this fraction of failed rows, after committing",
    )
    # With output.mode: resume, also re-run the rows whose vb_error is set; each result replaces
    # the row's previous one, so every id stays exactly once.
    retry_failed: bool = Field(default=False, description="with output.mode resume: re-run rows whose vb_error is set")


class JobConfig(_Section):
    input: InputConfig = Field(description="where the images come from")
    output: OutputConfig = Field(default_factory=OutputConfig, description="where the labels go")
    tasks: list[str] = Field(
        default_factory=lambda: ["depth"], min_length=1,
        description="depth | normals | segmentation | referring",
    )
    depth: DepthConfig = Field(default_factory=DepthConfig, description="depth codec")
    normals: NormalsConfig = Field(default_factory=NormalsConfig, description="normals codec")
    segmentation: SegmentationConfig = Field(
        default_factory=SegmentationConfig,
        description="segmentation legend and decoding",
    )
    referring: ReferringConfig = Field(default_factory=ReferringConfig, description="referring segmentation")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model backend")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="where the stages run")
    run: RunConfig = Field(default_factory=RunConfig, description="run-wide settings")

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
        # Every problem at once (one message, a line each): a user fixes them in one edit.
        problems = []
        if not self.model.backend:
            problems.append(
                "model.backend: required, e.g. marigold (with model.path), diffusers, http, demo, or identity to "
                "decode the input images themselves as paintings (codec debugging)"
            )
        else:
            problems += self.model.backend_options.problems(self.model)
        if "segmentation" in self.tasks and not (self.segmentation.classes or self.segmentation.legend):
            problems.append("task 'segmentation' needs segmentation.classes or segmentation.legend")
        if "referring" in self.tasks and not (self.referring.phrase or self.referring.phrase_column):
            problems.append("task 'referring' needs referring.phrase or referring.phrase_column")
        if problems:
            raise ValueError("\n".join(problems))
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


def config_problems(data: dict[str, Any]) -> list[str]:
    """Every problem of a config (as a dict), one line each, `field: what is wrong`; [] when it is valid.

    pydantic reports every bad field, but skips a section's cross-field checks while one of its
    fields is bad. So the bad keys are dropped (their defaults stand in) and the rest validated
    again, until nothing new turns up: every semantic error shows at once, not the first.

    >>> config_problems({"input": {"path": "in.parquet"}, "model": {"backend": "demo", "batch_size": 0},
    ...                  "tasks": ["segmentation"]})
    ['model.batch_size: Input should be greater than 0', "task 'segmentation' needs segmentation.classes or segmentation.legend"]
    """
    problems: list[str] = []
    data = copy.deepcopy(data)
    for _ in range(4):  # each round drops keys; sections nest 2 deep (storage: 3)
        try:
            JobConfig.model_validate(data)
            break
        except ValidationError as exc:
            # A field said wrong in an earlier round is dropped now: its default's own complaint
            # (`model.backend: required` after an unknown backend) would only repeat it.
            named = {line.partition(": ")[0] for line in problems}
            found = [line for line in _problem_lines(exc) if line not in problems and line.partition(": ")[0] not in named]
            problems += found
            dropped = [_drop(data, e["loc"]) for e in exc.errors() if len(e["loc"]) >= 2 or e["loc"][:1] == ("tasks",)]
            if not found or not any(dropped):
                break
    return problems


def _drop(data: Any, loc: tuple) -> bool:
    """Remove the key at `loc` (a list item: the whole list) so that its default stands in; False if none."""
    keys = [k for k in loc if isinstance(k, str)]
    node = data
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and keys and keys[-1] in node:
        del node[keys[-1]]
        return True
    return False


def _problem_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not field:  # a check across sections names its own fields (one line per problem)
            lines += msg.splitlines()
            continue
        if e["type"] == "extra_forbidden":
            msg = UNKNOWN_KEY
        if msg == UNKNOWN_KEY:
            msg += _did_you_mean(e["loc"])
        lines.append(f"{field}: {msg}")
    return lines


def _did_you_mean(loc: tuple) -> str:
    """ "; did you mean 'path'?" for an unknown key close to one its section declares; else ""."""
    import difflib
    import typing

    section: Any = JobConfig
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        kinds = (field.annotation, *typing.get_args(field.annotation)) if field else ()
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is None:
            return ""
    known = set(section.model_fields)
    if section is ModelConfig:  # the model section also holds every backend's own keys
        from vb_batch.models.options import BUILTIN_OPTIONS

        known |= {key for options in BUILTIN_OPTIONS.values() for key in options.model_fields}
    close = difflib.get_close_matches(str(loc[-1]), sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(problems: list[str]) -> str:
    return "invalid job config:\n" + "\n".join(f"  {line}" for line in problems)


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a validated `JobConfig` from a YAML path (or dict) and `a.b=value` overrides.

    A YAML file is read by `vb_batch.job_yaml.read_job_yaml`: `${VAR}` / `${VAR:-default}`
    substituted, relative paths resolved against the file's folder. A dict and the overrides
    are taken as given (relative paths: the working directory's).

    >>> cfg = load_config({"input": {"path": "images/"}, "model": {"backend": "identity"}}, ["model.batch_size=4"])
    >>> cfg.model.batch_size
    4
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = source
    else:
        from vb_batch.job_yaml import read_job_yaml

        data = read_job_yaml(source)  # ${VAR} filled in, relative paths against the file's folder
    data = apply_overrides(data, overrides or [])  # as typed: relative to the working directory
    try:
        return JobConfig.model_validate(data)
    except ValidationError:
        raise ConfigError(_describe(config_problems(data))) from None


def redacted(cfg: JobConfig) -> dict[str, Any]:
    """The config as a plain dict with its secrets masked: what logs, `validate`, `vb.job` and run records show.

    Masked (see `vb_batch.masking.redact`): values of secret-looking keys (secret, token,
    password, key, credential), every `model.headers` value, and the userinfo, query string
    and fragment of every URL (model.endpoint, storage endpoints, catalog URIs, paths, prefixes).
    """
    from vb_batch.masking import redact

    return redact(cfg.model_dump(mode="json"))
