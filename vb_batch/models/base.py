"""The model protocol and the backend registry.

A backend takes a batch of RGB uint8 images (H, W, 3) with one prompt per
image and returns one answer per image: a *painting* (uint8 RGB that a codec
decodes) or, for tasks the backend lists in `native_tasks`, the values
themselves (float32 depth (H, W) or unit normals (H, W, 3) in the OpenGL
frame). Answers have the input's size or the model's own; the decode stage
maps them back to the input size.

A backend that knows a row failed (a remote call that kept failing) returns
a `vb_batch.errors.RowError` in that row's place: the row gets that
`vb_error` and the others keep their answers. A backend that raises instead
fails its batch, whose rows the model stage then retries one by one.

Backends are looked up by name in `BACKENDS` (a `vb_batch.registry.Registry`),
which maps a name to "module:Class" so that heavy imports (torch, diffusers)
happen only when a job uses that backend.

Everything the rest of vb_batch asks of a backend is declared on `ModelBackend`
with a default, so the core names no backend and never probes with `getattr`:

- `options_model`: the backend's own config keys (`vb_batch.models.options`);
  a key the backend does not declare is a config error.
- classmethods answered from the config, before (or without) loading a model:
  `native_tasks_of`, `needs_state_dir`, `resolved_settings`,
  `working_resolution` (how far images may be decoded reduced), `provenance`
  (the `vb_model` of every row), `cost_estimate` (hosted models' requests and
  price), `preflight` (the plan's model checks: weights at hand, device, token;
  see `vb_batch.models.preflight`).
- on a loaded model: `supported_tasks`, `batch_key`, `predict`.

The functions below (`working_resolution`, `groups_by_size`, `cost_estimate`,
`model_id`, `options_model`) are what the pipeline, the engines and the config
call with a `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from vb_batch.errors import ConfigError, RowError
from vb_batch.models.options import BUILTIN_OPTIONS, UNKNOWN_KEY, BackendOptions, FreeFormOptions
from vb_batch.registry import Registry

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig
    from vb_batch.models.preflight import Check


class ModelBackend:
    """Base class of every backend; see the module docstring for the contract."""

    name: ClassVar[str]
    default_profile: ClassVar[str] = "vision-banana"
    # The backend's own config keys; a backend that declares none takes the free-form `model.options`.
    options_model: ClassVar[type[BackendOptions]] = FreeFormOptions
    device: str = "cpu"  # where the model runs; painted answers can be decoded there (model.decode_on_device)

    def __init__(self, cfg: "ModelConfig | None"):
        # What `validate` reports for a job, a backend made from a bare ModelConfig refuses too.
        # None: a backend handed over ready-made (`annotate(..., backend=...)`), which reads no config.
        problems = cfg.backend_options.problems(cfg) if cfg is not None and cfg.backend else []
        if problems:
            raise ConfigError("\n".join(problems))
        self.cfg = cfg

    # ------------------------------------------------------------ known from the config alone
    @classmethod
    def native_tasks_of(cls, cfg: "ModelConfig") -> set[str]:
        """Tasks this backend answers with values rather than a painting (known before loading)."""
        return set()

    @classmethod
    def needs_state_dir(cls, cfg: "ModelConfig") -> bool:
        """Whether this backend records remote jobs under the output (`model.state_url`, set by the plan)."""
        return False

    @classmethod
    def resolved_settings(cls, cfg: "ModelConfig") -> dict:
        """The defaults this backend fills in for `cfg` (steps, guidance, sizes), for `validate` and the run record."""
        return {}

    @classmethod
    def working_resolution(cls, cfg: "ModelConfig") -> int | None:
        """R such that the model works on at most about R*R pixels of an image; None: it may use the input's size.

        Known before loading; images are decoded reduced to what R needs (JPEG draft mode). The
        default, None, decodes every image in full: right for a backend that sends the image as is.
        """
        return None

    @classmethod
    def provenance(cls, cfg: "ModelConfig") -> str:
        """What produced the labels, after `<backend>:` in `vb_model`: by default the checkpoint and `@<revision>`.

        Shown in every row: a URL in it must go through `public_url` (no credentials or query).
        """
        path = cfg.path
        if isinstance(path, dict):
            source = ",".join(f"{task}={public_url(p)}" for task, p in sorted(path.items()))
        else:
            source = public_url(path) if path else ""
        return f"{source}@{cfg.revision}" if cfg.revision else source

    @classmethod
    def cost_estimate(cls, cfg: "ModelConfig", rows: int, passes: int) -> dict[str, Any] | None:
        """The requests and price of a run over `rows` rows, `passes` model passes each; None: nothing to price."""
        return None

    @classmethod
    def reports_usage(cls, cfg: "ModelConfig") -> bool:
        """Whether rows get the tokens and cost the service billed (`vb_usage`, through `take_usage`)."""
        return False

    @classmethod
    def answer_metadata(cls, cfg: "ModelConfig") -> dict[str, str]:
        """Field metadata for every task column: how answers were fitted to the model (hosted models' padding)."""
        return {}

    @classmethod
    def preflight(cls, cfg: "ModelConfig", *, local: bool) -> list["Check"]:
        """What `vb-batch plan` can check of the model without loading it (weights at hand, device, token).

        `local`: the model loads in this process (the local engine), so its device can be checked here.
        """
        return []

    # ------------------------------------------------------------ the loaded model
    # Model calls the model stage may have running at once (a Batch API's jobs); 1: one call at a time.
    calls_in_flight: int = 1

    def take_usage(self, seed: int) -> dict[str, Any] | None:
        """The tokens and cost billed for the row of `seed` since the last take (all its tasks); None: none."""
        return None

    def cancel_calls(self) -> None:
        """The model stage stopped before its calls in flight ended: make them end soon (their rows are dropped).

        Calls started after this one are not affected. A Batch API's polls end; its jobs run on at
        the service and a resume re-attaches to them.
        """

    def supported_tasks(self) -> set[str]:
        return {"depth", "normals", "segmentation", "referring"}

    def batch_key(self, image: np.ndarray) -> Hashable:
        """Images of equal keys make one model call (e.g. one working size); None, the default: any images do.

        The model stage groups rows by this key across a window of batches (`model.group_window`),
        so that mixed-size photos still fill `model.batch_size` calls. It must be cheap (no pixels
        read) and never raise; `predict` must still take images of mixed keys.
        """
        return None

    def predict(
        self, images: list[np.ndarray], prompts: list[str], task: str, seeds: list[int]
    ) -> list[np.ndarray | RowError]:
        """One answer (or RowError) per image. `seeds` makes sampling reproducible per image, whatever the batching."""
        raise NotImplementedError


def model_id(cfg: "ModelConfig") -> str:
    """Provenance: what produced the labels, `<backend>:<what>[@<revision>]`, after the colon the backend's `provenance`.

    The default is the checkpoint path or hub id (one per task: `depth=...,normals=...`); the
    http backend shows its endpoint, hosted ones the vendor's model id, diffusers adds a
    fine-tuned transformer. `vb_model` is written into every row: no URL shows credentials,
    a query string or a fragment.
    """
    source = backend_class(cfg.backend).provenance(cfg)
    return f"{cfg.backend}:{source}" if source and not source.startswith("@") else cfg.backend + source


def public_url(url: str) -> str:
    """`url` without user info, query and fragment: safe for logs, errors and provenance; not a URL: as given.

    >>> public_url("https://user:pw@Painter.example.com:8443/v1/edit?key=abc#x")
    'https://painter.example.com:8443/v1/edit'
    >>> public_url("prs-eth/marigold-depth-v1-1")
    'prs-eth/marigold-depth-v1-1'
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a malformed host or port: nothing in it is known to be safe to show
        return f"{url.partition('://')[0]}://?"
    if ":" in host:  # IPv6 keeps its brackets
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _check_backend_class(found, name: str) -> None:
    if not (isinstance(found, type) and issubclass(found, ModelBackend)):
        raise ConfigError(f"model.backend: {name!r} is not a vb_batch ModelBackend")


# Backends by name; "package.module:Class" also works unregistered (a user's own backend,
# which then reaches Spark executors and Ray workers that never ran `register_backend`).
BACKENDS: Registry[type[ModelBackend]] = Registry(
    "backend",
    field="model.backend",
    entries={
        "identity": "vb_batch.models.identity:IdentityBackend",
        "marigold": "vb_batch.models.marigold:MarigoldBackend",
        "diffusers": "vb_batch.models.diffusers_edit:DiffusersEditBackend",
        "http": "vb_batch.models.http:HttpBackend",
        "gemini": "vb_batch.models.gemini:GeminiBackend",
        "openai": "vb_batch.models.openai_images:OpenAIImagesBackend",
        "demo": "vb_batch.models.demo_generalist:DemoBackend",
    },
    check=_check_backend_class,
    any_target=True,
)


def register_backend(name: str, target: str | type[ModelBackend], *, replace: bool = False) -> None:
    """Make a backend available by name; `target` is "package.module:ClassName" (or the class)."""
    BACKENDS.register(name, target, replace=replace)


def backend_class(name: str) -> type[ModelBackend]:
    """The class of a registered backend, or of "package.module:Class" (a user's own backend)."""
    return BACKENDS[name]


def resolved_model_settings(cfg: "ModelConfig") -> dict:
    """What the model will run with where the config leaves it to the backend (e.g. a distilled klein's 4 steps).

    Read from local files only (the checkpoint's model_index.json), never downloaded: cheap enough for
    `vb-batch validate` and for the run record.
    """
    return backend_class(cfg.backend).resolved_settings(cfg)


def create_backend(cfg: "ModelConfig") -> ModelBackend:
    return backend_class(cfg.backend)(cfg)


def options_model(name: str) -> type[BackendOptions]:
    """The options model of backend `name`: a built-in's without importing it, anyone else's from its class."""
    target = BACKENDS.entries.get(name, name)
    if isinstance(target, str) and target in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[target]
    return backend_class(name).options_model


def option_users(key: str) -> list[str]:
    """The registered backends that declare `key` (those not imported yet only when built in), sorted."""
    users = []
    for name, target in BACKENDS.entries.items():
        options = BUILTIN_OPTIONS.get(target) if isinstance(target, str) else target.options_model
        if options is not None and key in options.model_fields:
            users.append(name)
    return sorted(users)


def backend_option_values(backend: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The keys `given` for `backend` beyond the common ones, validated by its options model, defaults filled in.

    A `ValidationError` of one line per bad key otherwise (`ModelConfig` reports them as
    `model.<key>`): a key the backend does not declare names the backends that do, unless its
    value is null (it sets nothing). Without a backend (a config that is refused for that)
    only keys no backend knows are errors.

    >>> backend_option_values("http", {"endpoint": "https://painter.example.com/edit"})["max_retries"]
    4
    >>> backend_option_values("identity", {"vertex": True})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
    vertex
      not used by backend 'identity' (used by: gemini) [type=model_key, input_value=True, input_type=bool]
    """
    given = dict(given)
    if backend is None:
        errors = [_key_error(key, value, UNKNOWN_KEY) for key, value in given.items() if not option_users(key)]
        if errors:
            raise ValidationError.from_exception_data("ModelConfig", errors)
        return given
    try:
        options_cls = options_model(backend)
    except ConfigError as exc:
        raise ValidationError.from_exception_data(
            "ModelConfig", [_key_error("backend", backend, str(exc).removeprefix("model.backend: "))]) from None
    for key in [key for key in given if key not in options_cls.model_fields and given[key] is None]:
        del given[key]  # `key: null` (or `key=null` on the command line) sets nothing: the key stays unset
    errors = [_key_error(key, given.pop(key), _unused(key, backend)) for key in list(given)
              if key not in options_cls.model_fields]
    try:
        options = options_cls.model_validate(given)
    except ValidationError as exc:
        errors += [InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
                   for e in exc.errors()]
    if errors:
        raise ValidationError.from_exception_data("ModelConfig", errors)
    return {name: getattr(options, name) for name in options_cls.model_fields}


def _unused(key: str, backend: str) -> str:
    users = option_users(key)
    return f"not used by backend {backend!r} (used by: {', '.join(users)})" if users else UNKNOWN_KEY


def _key_error(key: str, value: Any, message: str) -> InitErrorDetails:
    # The message is a template: braces in it (a key's name) are doubled to stay text.
    return InitErrorDetails(type=PydanticCustomError("model_key", message.replace("{", "{{").replace("}", "}}")),
                            loc=(key,), input=value)


def working_resolution(cfg: "ModelConfig") -> int | None:
    """The backend's `working_resolution` for `cfg`: how far images may be decoded reduced (None: in full).

    >>> from vb_batch.config import ModelConfig
    >>> working_resolution(ModelConfig(backend="marigold", path="m", processing_resolution=768))
    768
    >>> working_resolution(ModelConfig(backend="identity")) is None
    True
    """
    return backend_class(cfg.backend).working_resolution(cfg)


def groups_by_size(cfg: "ModelConfig") -> bool:
    """Whether the backend groups rows into calls by working size (it overrides `batch_key`), known unloaded."""
    return backend_class(cfg.backend).batch_key is not ModelBackend.batch_key


def cost_estimate(cfg: "ModelConfig", rows: int, passes: int) -> dict[str, Any] | None:
    """The backend's `cost_estimate` (requests and price before a run), or None for a backend with nothing to price."""
    return backend_class(cfg.backend).cost_estimate(cfg, rows, passes)
