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
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.registry import Registry

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig


class ModelBackend:
    """Base class of every backend; see the module docstring for the contract."""

    name: ClassVar[str]
    default_profile: ClassVar[str] = "vision-banana"
    device: str = "cpu"  # where the model runs; painted answers can be decoded there (model.decode_on_device)

    def __init__(self, cfg: "ModelConfig"):
        self.cfg = cfg

    @classmethod
    def native_tasks_of(cls, cfg: "ModelConfig") -> set[str]:
        """Tasks this backend answers with values rather than a painting (known before loading)."""
        return set()

    @classmethod
    def needs_state_dir(cls, cfg: "ModelConfig") -> bool:
        """Whether this backend records remote jobs under the output (`model.state_url`, set by the plan)."""
        return False

    def supported_tasks(self) -> set[str]:
        return {"depth", "normals", "segmentation", "referring"}

    @classmethod
    def resolved_settings(cls, cfg: "ModelConfig") -> dict:
        """The defaults this backend fills in for `cfg` (steps, guidance, sizes), for `validate` and the run record."""
        return {}

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
    """Provenance: what produced the labels (backend, checkpoint path or hub id, revision).

    A fine-tuned transformer over a base checkpoint adds `+transformer=<path>[/<subfolder>][@<revision>]`;
    the http backend's endpoint, and any checkpoint given as a URL, is shown by `public_url` (no
    credentials, query string or fragment): `vb_model` is written into every row.
    """
    path = cfg.path
    if isinstance(path, dict):
        path = ",".join(f"{task}={public_url(p)}" for task, p in sorted(path.items()))
    elif path:
        path = public_url(path)
    if cfg.backend == "http" and cfg.endpoint:
        path = public_url(cfg.endpoint)
    if cfg.backend in HOSTED_BACKENDS:  # the vendor's model id (and a base URL of the user's), never a key
        path = cfg.model_name or "?"
        if cfg.endpoint:
            path += f"+endpoint={public_url(cfg.endpoint)}"
        if cfg.vertex:
            path += "+vertex"
    ident = f"{cfg.backend}:{path}" if path else cfg.backend
    ident = f"{ident}@{cfg.revision}" if cfg.revision else ident
    if cfg.transformer_path or cfg.transformer_subfolder:
        transformer = public_url(cfg.transformer_path or path).rstrip("/")
        if cfg.transformer_subfolder:
            transformer += "/" + cfg.transformer_subfolder.strip("/")
        ident += f"+transformer={transformer}" + (f"@{cfg.transformer_revision}" if cfg.transformer_revision else "")
    return ident


# Backends whose `model.model_name` is a hosted model's id (shown in provenance).
HOSTED_BACKENDS = frozenset({"gemini", "openai"})


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
