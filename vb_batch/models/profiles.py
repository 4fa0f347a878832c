"""Model profiles: a backend's prompts per task and the codec presets its paintings follow.

A profile is what a checkpoint was trained to understand and to paint. The
backend (how to run it) and the profile (what to ask it, how to read its
answer) are chosen separately: `model.backend` and `model.profile`.

    vision-banana       metric depth (metres) on the cube walk; the default prompts
    open-vision-banana  relative depth: decoded through its walk and labelled
                        "relative", never metres (Open Vision Banana, FLUX.2 [klein])
    marigold            native outputs: affine-invariant depth (relative) and normals
    hosted-zero-shot    hosted generalists (gemini, openai) asked zero-shot: prompts that spell the
                        painting out, relative depth; UNVERIFIED against any instruction-tuned checkpoint

Segmentation prompts keep their `{legend}` slot in every profile, so that
test-time ensembling (`segmentation.ensemble: K`) can ask each pass for its
own permuted legend. Add a profile with `register_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vb_batch.codecs import depth as depth_codec
from vb_batch.registry import Registry
from vb_batch.tasks import TASKS


@dataclass(frozen=True)
class ModelProfile:
    name: str
    depth_preset: str | dict[str, Any] = "vision-banana"
    # Relative (affine-invariant) depth is labelled as such and never stored as metres.
    depth_relative: bool = False
    # Prompt per task; a task left out uses its own default (`vb_batch.tasks.Task.default_template`).
    templates: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for task, template in self.templates.items():
            if task not in TASKS:
                raise ValueError(f"profile {self.name!r}: template for unknown task {task!r}; known: {TASKS.names()}")
            missing = [slot for slot in TASKS[task].template_slots if slot not in template]
            if missing:
                raise ValueError(f"profile {self.name!r}: the {task} template must contain {missing}")


# Open Vision Banana (FunAILab/Open-Vision-Banana: a FLUX.2 [klein] base with a fine-tuned
# transformer) predicts relative depth. Its exact colour mapping is not published in a form we
# could check: this preset assumes Vision Banana's cube walk (unverified) and has its own name,
# so the stored `vb.preset` says which mapping decoded a row, and a verified mapping replaces it
# here (or per job: `depth.preset: {...}`) without touching other profiles.
OPEN_VISION_BANANA_DEPTH = depth_codec.register_preset(depth_codec.DepthPreset(name="open-vision-banana"))

RELATIVE_DEPTH_TEMPLATE = (
    "Estimate the relative depth of this image. Paint it as a colour map that walks the RGB cube "
    "from near to far: black, red, yellow, green, cyan, blue, magenta, white."
)

# Hosted generalists asked zero-shot (the gemini and openai backends' default): UNVERIFIED. No
# instruction-tuned checkpoint was checked against these prompts; they spell the painting out for a
# general image editor (same framing, flat colours, no text), and depth is labelled relative, never
# metres, since a model not trained on the walk has no metric scale. An endpoint that serves a
# Vision Banana checkpoint takes `model.profile: vision-banana`; any prompt is replaced per job with
# `model.prompts: {task: template}`.
HOSTED_ZERO_SHOT_DEPTH = depth_codec.register_preset(depth_codec.DepthPreset(name="hosted-zero-shot"))
HOSTED_ZERO_SHOT_TEMPLATES = {
    "depth": (
        "Replace this photo with a depth map of the same scene, with the same framing. Colour every pixel by "
        "its distance from the camera, walking the edges of the RGB colour cube from near to far: black "
        "(nearest), red, yellow, green, cyan, blue, magenta, white (farthest, and the sky). Flat colours only: "
        "no text, no legend, no texture from the photo."
    ),
    "normals": (
        "Replace this photo with a surface-normal map of the same scene, with the same framing. Colour every "
        "pixel by the direction its surface faces, RGB = (n + 1) / 2 * 255: red grows to the right, green grows "
        "upward, blue grows toward the viewer (a wall facing the camera is (128, 128, 255)). No text, no legend."
    ),
    "segmentation": (
        "Replace this photo with a semantic segmentation map of the same scene, with the same framing. Fill "
        "every pixel with the exact colour of its class: {legend}; anything else = black (0, 0, 0). Flat "
        "colours only: no outlines, no text, no legend."
    ),
    "referring": (
        "Replace this photo with a mask with the same framing: paint {phrase} pure white (255, 255, 255) and "
        "everything else pure black (0, 0, 0). No text."
    ),
}

PROFILES: Registry[ModelProfile] = Registry(
    "profile",
    field="model.profile",
    entries={
        "vision-banana": ModelProfile("vision-banana"),
        "open-vision-banana": ModelProfile(
            "open-vision-banana",
            depth_preset=OPEN_VISION_BANANA_DEPTH.name,
            depth_relative=True,
            templates={"depth": RELATIVE_DEPTH_TEMPLATE},
        ),
        "marigold": ModelProfile("marigold", depth_relative=True),
        "hosted-zero-shot": ModelProfile(
            "hosted-zero-shot",
            depth_preset=HOSTED_ZERO_SHOT_DEPTH.name,
            depth_relative=True,
            templates=HOSTED_ZERO_SHOT_TEMPLATES,
        ),
    },
)


def register_profile(profile: ModelProfile, *, replace: bool = False) -> ModelProfile:
    """Make a profile available to `model.profile` by its name."""
    PROFILES.register(profile.name, profile, replace=replace)
    return profile


def get_profile(name: str) -> ModelProfile:
    return PROFILES[name]
