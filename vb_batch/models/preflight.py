"""What a plan can check of a model without loading it: one `Check` per finding, and the local-checkpoint checks.

`ModelBackend.preflight(cfg, local=...)` returns these for `vb-batch plan` (and
`validate --live`): read-only, no download, no model loaded. The backends that
load a checkpoint on this machine share `checkpoint_checks` (weights at hand,
the device usable); `local=False` means the model loads on Ray or Spark
workers, whose devices this process cannot see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vb_batch.errors import ConfigError

if TYPE_CHECKING:
    from vb_batch.config import ModelConfig


@dataclass
class Check:
    """One live check: its name, "ok" / "warning" / "error", and what it found."""

    name: str
    status: str
    detail: str
    fix_config: bool = False  # an error that a change of the config (or of the input it names) fixes


def checkpoint_checks(cfg: "ModelConfig", *, local: bool, extra_sources: tuple[tuple[str, str | None], ...] = ()
                      ) -> list[Check]:
    """Weights of `model.path` (one per task too) and of `extra_sources` (field, path) at hand; the device, if `local`."""
    paths = cfg.path if isinstance(cfg.path, dict) else {"": cfg.path} if cfg.path else {}
    sources = [(f"model.path{'.' + task if task else ''}", path) for task, path in paths.items()]
    sources += [(field, path) for field, path in extra_sources if path]
    checks = [weights_check(field, source, cfg.revision) for field, source in sources]
    if local:
        checks.append(device_check(cfg.device))
    return checks


def device_check(device: str) -> Check:
    """`model.device` resolved on this machine (auto -> cuda or cpu), or why it cannot be used here."""
    from vb_batch.models.loading import resolve_device

    try:
        return Check("device", "ok", f"model.device {device} -> {resolve_device(device)}")
    except ConfigError as exc:
        return Check("device", "error", str(exc), True)


def weights_check(field_name: str, source: str, revision: str | None) -> Check:
    """A checkpoint directory that holds a saved pipeline or model, or a hub id in the local cache (else a warning)."""
    from vb_batch.models.loading import hub_offline

    name = f"weights {field_name}"
    if os.path.isdir(source):
        found = any((Path(source) / f).exists() for f in ("model_index.json", "config.json"))
        return Check(name, "ok" if found else "error", f"{source}" + ("" if found else
                     ": a directory without model_index.json or config.json: not a saved pipeline or model"), not found)
    if os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1:
        return Check(name, "error", f"{field_name}: checkpoint directory {source!r} does not exist", True)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(source, f, revision=revision), str)
                     for f in ("model_index.json", "config.json"))
    except Exception:  # noqa: BLE001 - no hub client or a malformed id: say what is known
        cached = False
    if cached:
        return Check(name, "ok", f"{source} (in the local Hugging Face cache)")
    if hub_offline():
        return Check(name, "error", f"{field_name}: {source!r} is not in the local Hugging Face cache and "
                                    "HF_HUB_OFFLINE is set: download it first or give a local directory", True)
    return Check(name, "warning", f"{source} is not in the local Hugging Face cache: the run downloads it "
                                  "(needs hub access)")
