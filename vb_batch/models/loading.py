"""How every diffusers-based backend loads a checkpoint: safetensors only, no remote code, offline-aware.

A local directory, or any source while `HF_HUB_OFFLINE` is set, loads from
local files only; missing weights are a `ConfigError` naming the config field.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from vb_batch.config import ConfigError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; anything else as given, once this process can use it.

    Called where the model loads (the local process, a Ray actor, a Spark executor), not when the
    config is read: a driver without a GPU may well drive workers that have one. A device this
    process cannot use is a `ConfigError` naming `model.device`, not a traceback from deep in torch.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ConfigError(
                f"model.device: {device!r}, but this torch build ({torch.__version__}) has no CUDA: install a CUDA "
                "build of torch (https://pytorch.org/get-started/locally/), or use model.device: cpu (or auto)"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"model.device: {device!r}, but torch sees no CUDA GPU here (check the driver and "
                "CUDA_VISIBLE_DEVICES), or use model.device: cpu (or auto)"
            )
        if index and int(index) >= count:
            raise ConfigError(f"model.device: {device!r}, but only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {device!r}, but MPS (Apple GPU) is not available here; use cpu or auto")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"model.device: {device!r}, but no Intel XPU is available to this torch; use cpu or auto")
    return device


def to_device(array: np.ndarray, device: Any) -> Any:
    """A numpy array as a torch tensor on `device`; to a GPU from pinned memory, without blocking the host.

    Callers send uint8 pixels (a quarter of float32's bytes) and convert on the device.
    """
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def use_channels_last(pipe: Any) -> None:
    """Convolutional components (UNet, VAE) in channels-last memory, the layout GPU convolution kernels prefer."""
    import torch

    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)


def compile_denoiser(pipe: Any) -> None:
    """`torch.compile` the pipeline's denoiser (transformer or UNet) in place: the module keeps its config and dtype."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ConfigError(f"model.compile: {type(pipe).__name__} has no transformer or unet to compile")
    denoiser.compile()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def local_only(source: str, field_name: str) -> bool:
    """True when `source` must load from local files; a missing local directory is a ConfigError."""
    if os.path.isdir(source):
        return True
    # A hub id is "name" or "owner/name"; anything else names a local directory.
    if os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1:
        raise ConfigError(f"{field_name}: checkpoint directory {source!r} does not exist")
    return hub_offline()


def load_error(field_name: str, source: str, exc: Exception, offline: bool) -> ConfigError:
    hint = (
        "its weights are not in the local files (HF_HUB_OFFLINE is set, or it is a directory): give a complete "
        "local checkpoint with safetensors weights, or download it first"
        if offline
        else "check the id, revision and access token"
    )
    return ConfigError(f"{field_name}: cannot load {source!r}: {hint} ({type(exc).__name__}: {exc})")


def quiet_loading() -> None:
    """Loading bars per component drown the job's own progress and summary (kept with -v)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from vb_batch.logs import json_logs

    if not log.isEnabledFor(logging.INFO) or json_logs():  # JSON logs: never a bar
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def from_pretrained(cls: Any, source: str, field_name: str, shown: str | None = None, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source, ...)` with safetensors only and offline handling; errors name `field_name`."""
    offline = local_only(source, field_name)
    try:
        return cls.from_pretrained(source, use_safetensors=True, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error(field_name, shown or source, exc, offline) from exc
