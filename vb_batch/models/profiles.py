"""Model profiles: a backend's prompts per task and the codec presets its paintings follow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vb_batch.config import ConfigError


@dataclass(frozen=True)
class ModelProfile:
    name: str
    depth_preset: str | dict[str, Any] = "vision-banana"
    # Relative (affine-invariant) depth is labelled as such and never stored as metres.
    depth_relative: bool = False
    templates: dict[str, str] = field(default_factory=dict)


PROFILES: dict[str, ModelProfile] = {
    "vision-banana": ModelProfile("vision-banana"),
    "marigold": ModelProfile("marigold", depth_relative=True),
}


def get_profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"model.profile: unknown profile {name!r}; known: {sorted(PROFILES)}") from None
