"""Working sizes for the instruction-edit pipelines: per-pipeline sizing rules and aspect-ratio buckets.

A painting lines up with its image only if the pipeline paints at the very size
it conditions at. Each pipeline resizes its condition image by its own rule
(diffusers 0.42), and vb_batch hands it images already at a size that rule
leaves alone (a *fixed point*), so the condition image and the painting are
one grid:

    Flux2KleinPipeline     a condition image over 1024**2 px is shrunk to that area, then each side is
                           floored to 16 px (centre crop); one under 64 px a side or over 8:1 is refused
                           (`check_image_input`). vb_batch: about `processing_resolution`**2, never over
                           1024**2 (rounded down), sides on the 16-px grid, at least 64 px, at most 8:1
                           (an image over 8:1 is that row's `image_unsupported_size` error).
    QwenImageEditPipeline  the condition image is always resized to about 1024**2 px on a 32-px grid
                           (`calculate_dimensions`, from the first image's aspect), whatever the output
                           size. vb_batch paints at that same size: about 1 MP whatever the input;
                           `processing_resolution` other than 1024 is refused.
    FluxKontextPipeline    with `_auto_resize` (its default) the condition image snaps to the nearest of
                           `PREFERRED_KONTEXT_RESOLUTIONS`; vb_batch turns that off and paints at its
                           own working size (any 16-px grid size). Its buckets are those preferred
                           resolutions (scaled to the working area), the sizes it was trained at.

`model.sizing` picks how a working size is chosen:

    exact    the image's own aspect, area about resolution**2 (per-image sizes: mixed-size photos
             rarely share one, so they rarely batch)
    buckets  the nearest (in log aspect) of a small fixed set of working sizes, one per common
             aspect ratio, as training pipelines bucket (SDXL, FLUX): every image of similar
             aspect shares one size and one model call. The image is stretched to the bucket
             (<= 9% in aspect up to 21:9, <= 15% for panoramas; no crop, no padding) and the
             decode stage stretches the decoded map back to the input size, so every input
             pixel has its label. Padding with a mask is not offered: these pipelines take no
             attention mask over image tokens, so padding would be painted on as content.

Everything here is pure arithmetic (no torch); tests check it against the pipelines' own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

SIZINGS = ("exact", "buckets")
# Width / height of the buckets: the usual photo and video aspects (1:1, 9:8, 5:4, 4:3, 3:2, 16:9, 2:1,
# 21:9) both ways up, plus panoramas to 4:1. Sorted, so that ties pick the same bucket everywhere. An image
# is stretched by at most half the gap to its bucket: <= 9% up to 21:9, <= 15% for panoramas.
BUCKET_ASPECTS = tuple(
    sorted({a for r in (1.0, 9 / 8, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0, 7 / 3, 3.0, 4.0) for a in (r, 1 / r)})
)
KLEIN_MAX_AREA = 1024 * 1024  # Flux2KleinPipeline.__call__: condition images over this area are shrunk
QWEN_CONDITION_AREA = 1024 * 1024  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, ...)


class SizeError(ValueError):
    """An image whose aspect no working size of this pipeline can hold (e.g. 1:400 under klein's limits)."""


@dataclass(frozen=True)
class SizingRule:
    """What one pipeline does to the size of its condition image, and the limits vb_batch works within."""

    pipeline: str
    multiple: int = 16  # the latent patch in pixels (VAE factor 8 x patch 2)
    min_side: int = 0  # smallest side the pipeline accepts
    max_area: int | None = None  # the pipeline shrinks condition images over this area
    fixed_area: int | None = None  # the pipeline always conditions at this area (Qwen)
    grid: int = 0  # the grid the pipeline's own resize rounds to, if coarser than `multiple`
    preferred: tuple[tuple[int, int], ...] = ()  # (height, width) the model was trained at (Kontext)
    max_aspect: float | None = None  # the pipeline refuses condition images more elongated than this

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the pipeline conditions at when handed an image of this size (its own code, mirrored)."""
        m = self.multiple
        if self.fixed_area:
            w, h = qwen_calculate_dimensions(self.fixed_area, width / height, self.grid or 32)
            return h // m * m, w // m * m
        if self.max_area and height * width > self.max_area:
            # Flux2ImageProcessor._resize_to_target_area: int() of the scaled sides.
            scale = math.sqrt(self.max_area / (width * height))
            height, width = int(height * scale), int(width * scale)
        return height // m * m, width // m * m

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the pipeline paints at when asked for this size."""
        m = self.multiple
        return height // m * m, width // m * m


RULES = {
    # Flux2ImageProcessor.check_image_input: sides >= 64, aspect <= 8.
    "Flux2KleinPipeline": SizingRule("Flux2KleinPipeline", min_side=64, max_area=KLEIN_MAX_AREA, max_aspect=8),
    "QwenImageEditPipeline": SizingRule("QwenImageEditPipeline", fixed_area=QWEN_CONDITION_AREA, grid=32),
    "FluxKontextPipeline": SizingRule(
        "FluxKontextPipeline",
        # diffusers' PREFERRED_KONTEXT_RESOLUTIONS, as (height, width); tests check them against the pipeline's.
        preferred=tuple(
            (h, w) for w, h in [
                (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                (1456, 720), (1504, 688), (1568, 672),
            ]
        ),
    ),
}


def qwen_calculate_dimensions(target_area: int, ratio: float, grid: int = 32) -> tuple[int, int]:
    """(width, height) as QwenImageEditPipeline's `calculate_dimensions`: the area at `ratio`, sides rounded to 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / grid) * grid, round(height / grid) * grid


def working_size(
    height: int, width: int, resolution: int, multiple: int, min_side: int = 0, max_area: int | None = None
) -> tuple[int, int]:
    """(h, w): the aspect of (height, width), area about resolution**2 (0: the input's), sides multiples of `multiple`.

    Under `max_area` the sides are rounded down, so the area never exceeds it; `min_side` wins over the
    area (a thin strip grows). A `SizeError` when both cannot hold.
    """
    scale = resolution / math.sqrt(height * width) if resolution else 1.0
    if max_area:
        scale = min(scale, math.sqrt(max_area / (height * width)))
    if min_side and min(height, width) * scale < min_side:
        scale = min_side / min(height, width)
        size = tuple(math.ceil(side * scale / multiple) * multiple for side in (height, width))
    else:
        size = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))
        if max_area and size[0] * size[1] > max_area:
            size = tuple(max(multiple, math.floor(side * scale / multiple) * multiple) for side in (height, width))
    if max_area and size[0] * size[1] > max_area:
        raise SizeError(
            f"a {width}x{height} image needs sides of at least {min_side} px within {max_area} px: "
            "crop it to a less extreme aspect ratio"
        )
    return size


@cache
def fixed_points(rule: SizingRule) -> tuple[tuple[int, int], ...]:
    """Every (height, width) a fixed-area pipeline (Qwen) conditions at, by aspect: its possible working sizes."""
    grid, area = rule.grid or 32, rule.fixed_area
    found = set()
    for width in range(grid, int(math.sqrt(area * 64)) + grid, grid):  # aspects to 64:1 either way
        # The width was rounded by up to half a grid step: the height lies within area / (width +- grid / 2).
        low, high = area / (width + grid / 2), area / max(width - grid / 2, 1)
        for height in range(max(grid, math.floor(low / grid) * grid), math.ceil(high / grid) * grid + grid, grid):
            if rule.condition_size(height, width) == (height, width):
                found.add((height, width))
    return tuple(sorted(found, key=lambda s: s[1] / s[0]))


def nearest(sizes, height: int, width: int) -> tuple[int, int]:
    """The size in `sizes` closest to the aspect of (height, width), in log aspect (first on ties)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))


def exact_size(rule: SizingRule, height: int, width: int, resolution: int) -> tuple[int, int]:
    """The working size of one image of (height, width): its own aspect, a size the pipeline keeps."""
    if rule.fixed_area:
        return nearest(fixed_points(rule), height, width)
    if rule.max_aspect and max(height, width) > rule.max_aspect * min(height, width):
        raise SizeError(
            f"a {width}x{height} image is over the {rule.max_aspect:g}:1 aspect {rule.pipeline} takes: crop it"
        )
    size = working_size(height, width, resolution, rule.multiple, rule.min_side, rule.max_area)
    if rule.max_aspect:
        # Rounding to the grid may push an aspect just under the limit over it: shorten the long side.
        short, long = sorted(size)
        while long > rule.max_aspect * short:
            long -= rule.multiple
        size = (short, long) if size[0] <= size[1] else (long, short)
    return size


@cache
def bucket_sizes(rule: SizingRule, resolution: int) -> tuple[tuple[int, int], ...]:
    """The fixed set of working sizes for `model.sizing: buckets`, each one the pipeline keeps as it is.

    Kontext at the default area: its preferred resolutions; at another area, those scaled. The others: one
    size per `BUCKET_ASPECTS` entry at the working area. 0 (the input's own size) has no buckets.
    """
    if not resolution and not rule.fixed_area:
        raise ValueError("buckets need a working area: set model.processing_resolution, or model.sizing: exact")
    m = rule.multiple
    if rule.preferred:
        scale = resolution / 1024
        shapes = [
            (max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)) for h, w in rule.preferred
        ]
    else:
        shapes = [exact_size(rule, 1000, round(1000 * a), resolution) for a in BUCKET_ASPECTS]
    return tuple(dict.fromkeys(shapes))  # neighbours may meet at small areas


def size_for(rule: SizingRule, height: int, width: int, resolution: int, sizing: str) -> tuple[int, int]:
    """The working (height, width) of an image under `model.sizing` (`exact` or `buckets`)."""
    if sizing == "buckets":
        size = nearest(bucket_sizes(rule, resolution), height, width)
        if rule.min_side and min(size) < rule.min_side:
            raise SizeError(f"bucket {size} is under {rule.min_side} px a side: raise model.processing_resolution")
        return size
    return exact_size(rule, height, width, resolution)
