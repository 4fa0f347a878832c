"""Metric depth (metres) <-> painted RGB, as Vision Banana paints it.

Two invertible steps, both parameters of a named `DepthPreset`:

1. Squash depth into f in [0, 1) with Barron's power transform,
   ``f(d) = 1 - (1 - d / (lam * c)) ** (lam + 1)``; for the default
   lam = -3, c = 10/3 that is ``1 - (1 + d / 10) ** -2``. Inverse:
   ``d = lam * c * (1 - (1 - f) ** (1 / (lam + 1)))``.
2. Walk the RGB cube along the polyline of the preset's vertices (default
   black -> red -> yellow -> green -> cyan -> blue -> magenta -> white, 7
   edges): ``s = 7 f``, ``k = min(floor(s), 6)``, ``t = s - k``,
   ``rgb = round(255 * (V[k] + t (V[k+1] - V[k])))``.

Decoding projects each (noisy) colour on every edge (t clipped to [0, 1]),
keeps the nearest point, ``f = (k + t) / 7`` and inverts step 1. The distance
to the walk, in 8-bit levels, gives the confidence
``exp(-distance**2 / (2 * preset.confidence_sigma**2))``: 1 on the walk.
The last vertex (white) means "far / sky": colours within half an 8-bit step
of it decode to +inf, or to ``preset.max_depth_m`` when the preset sets one.

Precision (default preset, 8 bits): 7 * 255 = 1785 steps of f; one step is
about 4 mm at 1 m, 2 cm at 10 m, 35 cm at 40 m. See docs/codecs.md.

Example:
    >>> import numpy as np
    >>> from vb_batch.codecs import depth
    >>> rgb = depth.encode(np.array([[0.0, 1.0], [10.0, np.inf]]))
    >>> rgb.tolist()
    [[[0, 0, 0], [255, 55, 0]], [[64, 0, 255], [255, 255, 255]]]
    >>> print(depth.decode(rgb).values.round(2))
    [[ 0.    1.  ]
     [10.01   inf]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Union

import numpy as np

from vb_batch.codecs import kernels
from vb_batch.codecs.base import (
    ArrayBackend,
    ColourTable,
    Decoded,
    decode_in_chunks,
    key_colours,
    painted_pixels,
)
from vb_batch.registry import Registry

CUBE_WALK = (
    (0.0, 0.0, 0.0),  # black: 0 m
    (1.0, 0.0, 0.0),  # red
    (1.0, 1.0, 0.0),  # yellow
    (0.0, 1.0, 0.0),  # green
    (0.0, 1.0, 1.0),  # cyan
    (0.0, 0.0, 1.0),  # blue
    (1.0, 0.0, 1.0),  # magenta
    (1.0, 1.0, 1.0),  # white: saturated, "far / sky"
)


@dataclass(frozen=True)
class DepthPreset:
    """One depth colour mapping: the power transform and the RGB walk.

    Attributes:
        name: registry key, e.g. "vision-banana".
        lam, c: Barron power transform parameters; lam < -1 so that f runs
            from 0 (d = 0) to 1 (d = inf); c > 0 sets the scale in metres.
        vertices: (M, 3) walk through the RGB cube in [0, 1] units; the
            first vertex is d = 0, the last one is "far".
        max_depth_m: what "far" decodes to and the cap on decoded depth;
            None decodes far as +inf and caps nothing.
        confidence_sigma: distance to the walk, in 8-bit levels, at which
            confidence has fallen to exp(-1/2) ~= 0.61.
    """

    name: str
    lam: float = -3.0
    c: float = 10.0 / 3.0
    vertices: tuple[tuple[float, float, float], ...] = CUBE_WALK
    max_depth_m: float | None = None
    confidence_sigma: float = 8.0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"DepthPreset {self.name!r}: {field} {why}")

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DepthPreset: name must be a non-empty string, got {self.name!r}")
        if not _is_finite_real(self.lam) or self.lam >= -1:
            fail("lam", f"must be a finite number < -1 so f(d) runs from 0 to 1; got {self.lam!r}")
        if not _is_finite_real(self.c) or self.c <= 0:
            fail("c", f"must be a finite number > 0 (a scale in metres); got {self.c!r}")
        try:
            vertices = np.asarray(self.vertices, dtype=np.float64)
        except (TypeError, ValueError):
            fail("vertices", f"must be an (M, 3) array of numbers; got {self.vertices!r}")
        if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] < 2:
            fail("vertices", f"must have shape (M, 3) with M >= 2; got shape {vertices.shape}")
        if not np.all(np.isfinite(vertices)) or vertices.min() < 0 or vertices.max() > 1:
            fail("vertices", "must lie in the unit RGB cube [0, 1] (255 = 1)")
        if len(np.unique(vertices, axis=0)) != len(vertices):
            fail("vertices", "must all be distinct, or the walk decodes ambiguously")
        if self.max_depth_m is not None and (
            not _is_finite_real(self.max_depth_m) or self.max_depth_m <= 0
        ):
            fail("max_depth_m", f"must be None or a finite number > 0; got {self.max_depth_m!r}")
        if not _is_finite_real(self.confidence_sigma) or self.confidence_sigma <= 0:
            fail("confidence_sigma", f"must be a finite number > 0; got {self.confidence_sigma!r}")
        object.__setattr__(self, "vertices", tuple(tuple(float(x) for x in v) for v in vertices))
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "c", float(self.c))

    @property
    def num_edges(self) -> int:
        return len(self.vertices) - 1


def _is_finite_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


# Squared distances to two edges within this ratio are a tie (float32 rounding is ~1e-7).
TIE_MARGIN = 1.0 - 1e-5

# Named presets (`depth.preset: <name>` in a job); `register_preset` adds a checkpoint's own mapping.
PRESETS: Registry[DepthPreset] = Registry("depth preset", field="depth.preset")

PresetLike = Union[str, DepthPreset, Mapping]


def register_preset(preset: DepthPreset | Mapping, *, replace: bool = False) -> DepthPreset:
    """Add a preset to `PRESETS` (a DepthPreset or a dict of its fields) and return it.

    Registering a different preset under a taken name needs `replace=True`.
    """
    preset = get_preset(preset) if isinstance(preset, Mapping) else preset
    if not isinstance(preset, DepthPreset):
        raise TypeError(f"register_preset: expected a DepthPreset or dict, got {type(preset).__name__}")
    PRESETS.register(preset.name, preset, replace=replace)
    return preset


def get_preset(preset: PresetLike) -> DepthPreset:
    """A DepthPreset from a registered name, a DepthPreset, or a dict of its fields.

    A dict (e.g. from a job config) may leave out fields; they take the
    vision-banana defaults. "name" defaults to "custom".
    """
    if isinstance(preset, DepthPreset):
        return preset
    if isinstance(preset, str):
        return PRESETS[preset]
    if isinstance(preset, Mapping):
        known = {f.name for f in fields(DepthPreset)}
        unknown = sorted(set(preset) - known)
        if unknown:
            raise ValueError(f"depth preset dict has unknown field(s) {unknown}; known: {sorted(known)}")
        return DepthPreset(**{"name": "custom", **preset})
    raise TypeError(
        f"depth preset must be a name, a DepthPreset or a dict; got {type(preset).__name__}"
    )


register_preset(DepthPreset(name="vision-banana"))


def squash(depth_m: Any, preset: PresetLike = "vision-banana") -> np.ndarray:
    """f(d) in [0, 1]: the power transform of step 1 (float64; +inf -> 1)."""
    preset = get_preset(preset)
    depth_m = np.asarray(depth_m, dtype=np.float64)
    return 1.0 - (1.0 - depth_m / (preset.lam * preset.c)) ** (preset.lam + 1.0)


def unsquash(f: Any, preset: PresetLike = "vision-banana") -> np.ndarray:
    """d(f), the inverse of `squash` (float64; f = 1 -> +inf)."""
    preset = get_preset(preset)
    remaining = 1.0 - np.asarray(f, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -preset.lam * preset.c * (remaining ** (1.0 / (preset.lam + 1.0)) - 1.0)


def encode(depth_m: Any, preset: PresetLike = "vision-banana") -> np.ndarray:
    """Paint depth in metres as uint8 RGB, shape depth_m.shape + (3,).

    Negative depths (including -inf) are clipped to 0 (black); +inf paints
    the last vertex (white, "far"). NaN has no colour that would not read
    back as a real depth, so it raises: fill or mask it first.
    """
    preset = get_preset(preset)
    depth_m = np.asarray(depth_m, dtype=np.float64)
    num_nan = int(np.isnan(depth_m).sum())
    if num_nan:
        raise ValueError(
            f"depth.encode: depth_m has {num_nan} NaN pixel(s); there is no colour for "
            "'unknown' on the depth walk. Replace them (e.g. with np.inf for sky) first."
        )
    f = squash(np.clip(depth_m, 0.0, None), preset)
    vertices = np.asarray(preset.vertices) * 255.0
    s = preset.num_edges * f
    edge = np.clip(np.floor(s), 0, preset.num_edges - 1).astype(np.intp)
    t = (s - edge)[..., None]
    rgb = vertices[edge] + t * (vertices[edge + 1] - vertices[edge])
    return np.rint(rgb).astype(np.uint8)


def decode(rgb: Any, preset: PresetLike = "vision-banana") -> Decoded:
    """Read depth back from a painted image.

    Args:
        rgb: uint8 (H, W, 3) or (N, H, W, 3), or float32 in 0..255; a numpy
            array or a torch tensor (decoded in torch on its device).
        preset: a registered name, a DepthPreset or a dict of its fields.

    Returns:
        Decoded with float32 `values` in metres (shape rgb.shape[:-1]; +inf
        or max_depth_m for "far") and float32 `confidence` in [0, 1]
        (``exp(-dist**2 / (2 sigma**2))`` of the distance to the walk in
        8-bit levels). NaN in float input gives NaN depth, confidence 0.

    numpy uint8 input goes through a per-preset table over the 2**24 colours
    (`codecs.base.ColourTable`), filled lazily with the exact computation below
    for the distinct colours an image brings that no image brought before: the
    same float32 values bit for bit, and a colour seen before costs one
    lookup. The table holds only the pages of colours seen, to at most 128 MB
    per preset (up to 4 presets per process).
    """
    preset = get_preset(preset)
    backend, pixels, lead_shape = painted_pixels(rgb, "depth")
    if not backend.is_torch and pixels.dtype == np.uint8:
        fast = kernels.active()
        lookup = None if fast is None else kernels.table_lookup(fast.depth_lookup, (np.float32, np.float32))
        depth_m, confidence = _decode_table(preset).decode(pixels, _unpack, lookup)
    else:
        depth_m, confidence = _decode_pixels(backend, pixels, preset)
    return Decoded(values=depth_m.reshape(lead_shape), confidence=confidence.reshape(lead_shape))


@functools.lru_cache(maxsize=4)
def _decode_table(preset: DepthPreset) -> ColourTable:
    walk, finish = _depth_steps(ArrayBackend(np), preset)
    # The walk's constants for the compiled walk, as numpy's float32 arithmetic sees the Python floats above.
    edges = _walk_edges(preset)
    starts = np.array([start for start, _, _ in edges], np.float32)
    directions = np.array([direction for _, direction, _ in edges], np.float32)
    steps = np.array([[d / length2 for d in direction] for _, direction, length2 in edges], np.float32)

    def compute_colours(keys: np.ndarray) -> np.ndarray:
        fast = kernels.active()
        if fast is None:
            nearest = walk(*key_colours(keys))
        else:
            nearest = np.empty(len(keys), np.float32), np.empty(len(keys), np.float32)
            fast.depth_walk(keys, starts, directions, steps, np.float32(TIE_MARGIN), *nearest)
        depth_m, confidence = finish(*nearest)
        # Both float32 words in one uint64, inverted: all ones (NaN, NaN) never comes out of uint8 colours, so no
        # entry is 0, the table's "not computed yet".
        packed = depth_m.astype(np.float32, copy=False).view(np.uint32).astype(np.uint64) << np.uint64(32)
        packed |= confidence.astype(np.float32, copy=False).view(np.uint32)
        return ~packed

    return ColourTable(compute_colours, np.uint64)


def _unpack(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Table entries -> float32 depth and confidence: each entry is two inverted little-endian float32 words,
    confidence low, depth high."""
    words = entries.view("<u4").reshape(-1, 2)
    return np.invert(words[:, 1]).view(np.float32), np.invert(words[:, 0]).view(np.float32)


def _decode_pixels(backend: ArrayBackend, pixels: Any, preset: DepthPreset) -> tuple[Any, Any]:
    """(P, 3) pixels (uint8, or float32 in 0..255) -> float32 depth in metres and confidence, computed directly."""
    return decode_in_chunks(backend, pixels, _depth_kernel(backend, preset), elements_per_pixel=24)


def _depth_kernel(backend: ArrayBackend, preset: DepthPreset) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """The element-wise decode: float32 red, green, blue planes (broadcastable) -> depth in metres, confidence."""
    walk, finish = _depth_steps(backend, preset)

    def depth_and_confidence(red: Any, green: Any, blue: Any) -> tuple[Any, Any]:
        return finish(*walk(red, green, blue))

    return depth_and_confidence


def _walk_edges(preset: DepthPreset) -> list[tuple[list[float], list[float], float]]:
    """(start, direction, squared length) per edge in 8-bit levels, as Python floats: numpy float64 scalars
    would promote float32 pixel math to float64."""
    vertices = np.asarray(preset.vertices) * 255.0
    edges = []
    for start, end in zip(vertices[:-1], vertices[1:]):
        direction = end - start
        edges.append((start.tolist(), direction.tolist(), float(direction @ direction)))
    return edges


def _depth_steps(backend: ArrayBackend, preset: DepthPreset) -> tuple[Callable[..., tuple[Any, Any]], Callable[..., tuple[Any, Any]]]:
    """The decode in two steps: `walk(red, green, blue)` -> (num_edges * (1 - f) of the nearest walk point,
    its squared distance), then `finish(remaining, distance2)` -> (depth in metres, confidence).
    `codecs._compiled.depth_walk` is `walk` compiled, the same float32 operations in the same order."""
    xp = backend.xp
    num_edges = preset.num_edges
    edges = _walk_edges(preset)

    # Within half an 8-bit step of the last vertex is saturated ("far").
    saturated_below = 0.5 / max(abs(d) for d in edges[-1][1])
    far_m = math.inf if preset.max_depth_m is None else float(preset.max_depth_m)
    exponent = 1.0 / (preset.lam + 1.0)
    scale_m = -preset.lam * preset.c
    confidence_factor = -0.5 / preset.confidence_sigma**2

    def walk(red: Any, green: Any, blue: Any) -> tuple[Any, Any]:
        # Track num_edges * (1 - f) of the nearest walk point rather than f: it
        # keeps precision as f -> 1, where depth is steep. Channels an edge does not
        # move along (most of them on the cube walk) skip their multiply-adds.
        best_remaining = best_distance2 = None
        for e, (start, direction, length2) in enumerate(edges):
            offsets = [plane - s if s else plane for plane, s in zip((red, green, blue), start)]
            along = sum(o * (d / length2) for o, d in zip(offsets, direction) if d)
            t = xp.clip(along, 0.0, 1.0)
            distance2 = sum((o - t * d if d else o) ** 2 for o, d in zip(offsets, direction))
            remaining = (num_edges - e) - t
            if best_distance2 is None:
                best_remaining, best_distance2 = remaining, distance2
            else:
                # Distances equal up to float32 rounding are a tie, and the earlier
                # edge (nearer depth) wins it, so numpy and torch pick the same edge
                # for colours equidistant from two edges (and for shared vertices).
                # Within a tie the distances agree to 1e-5, so the running minimum
                # is the chosen point's distance (and cheaper than a select).
                closer = distance2 < best_distance2 * TIE_MARGIN
                best_remaining = xp.where(closer, remaining, best_remaining)
                best_distance2 = xp.minimum(distance2, best_distance2)
        return best_remaining, best_distance2

    def finish(best_remaining: Any, best_distance2: Any) -> tuple[Any, Any]:
        saturated = best_remaining <= saturated_below
        one_minus_f = xp.clip(best_remaining, saturated_below, None) * (1.0 / num_edges)
        depth_m = scale_m * (one_minus_f**exponent - 1.0)
        if preset.max_depth_m is not None:
            depth_m = xp.clip(depth_m, None, far_m)
        depth_m = xp.where(saturated, far_m, depth_m)
        confidence = xp.exp(best_distance2 * confidence_factor)
        confidence = xp.where(xp.isnan(confidence), 0.0, confidence)  # NaN float input
        return depth_m, confidence

    return walk, finish
