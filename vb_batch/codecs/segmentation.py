"""Class ids <-> painted RGB through a colour legend, and the test-time ensemble vote.

The prompt carries the legend ("road = (128, 64, 128), car = (0, 0, 142), ...;
anything else = black"); the model paints every pixel with its class colour.
Black (0, 0, 0) is reserved for "anything else" and is never a class colour.

Decoding (`decode`): each pixel goes to the nearest candidate colour, the
legend's colours plus black, by Euclidean distance in 8-bit RGB. It is
unlabelled (`legend.unlabelled`: 255, or 65535 for legends of more than 255
classes) when the nearest candidate is black or farther than `max_distance`.
By default that distance is per class: ``DEFAULT_MAX_DISTANCE_FRACTION`` (one
half) of the distance from the class colour to the nearest other candidate
(`legend.class_separations()`). A labelled pixel is then always nearer its
colour than to any other, and a close pair (Cityscapes' bus and train, 20
apart) does not shrink the radius of well-separated classes. Confidence is
``1 - d1 / d2``, d1 the distance to the nearest candidate and d2 to the
runner-up: 1 on a legend colour, 0 on the boundary between two colours, and
0 for unlabelled pixels. Exact ties go to the colour that sorts first as
(r, g, b), and a class beats black. Float input is first rounded to 8-bit
levels; NaN pixels are unlabelled.

Speed: numpy decodes through a per-legend table over all 2**24 colours
(`codecs.base.ColourTable`), filled for the distinct colours an image brings
that no image brought before by `codecs.block_search`, which searches per
colour only the candidates that can win in its 8x8x8 block of colours and
returns the brute force's results bit for bit. A colour seen before costs one
lookup per pixel; the table holds only the pages of colours seen, to at most
64 MB per colour set (up to 4 colour sets per process). Permuted legends
share one table. torch computes the same thing by brute force, in chunks, on
the tensor's device.

Ensembling (`vote`): paint K passes, each with `legend.permuted(seed)` (same
class names and ids, colours shuffled), decode each with its own legend so
the ids are canonical, then take the per-pixel majority.

Example:
    >>> import numpy as np
    >>> from vb_batch.codecs import segmentation
    >>> legend = segmentation.Legend.cityscapes()
    >>> rgb = segmentation.encode(np.array([[0, 13], [255, 18]]), legend)
    >>> segmentation.decode(rgb, legend).values.tolist()
    [[0, 13], [255, 18]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vb_batch.codecs import kernels
from vb_batch.codecs.base import (
    ArrayBackend,
    ColourTable,
    Decoded,
    backend_of,
    decode_in_chunks,
    painted_pixels,
)
from vb_batch.codecs.block_search import block_bounds, nearest_of_colours

BLACK = (0, 0, 0)
DEFAULT_MAX_DISTANCE_FRACTION = 0.5
# Class ids must fit the values' dtype with one value left for "unlabelled", and
# the decode table packs (candidate index + 1) into 16 bits.
MAX_CLASSES = 65534

# Cityscapes' 19 train-id classes with their official colours, in train-id order.
CITYSCAPES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)

# Palette candidates: every 5th 8-bit level per channel (52**3 colours).
PALETTE_GRID_STEP = 5


@functools.lru_cache(maxsize=16)
def default_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, as far apart as greedy search finds.

    Greedy farthest-point sampling over a grid of the RGB cube, seeded with
    black: each new colour is the grid colour farthest from black and from all
    colours picked so far (first in r, g, b order on ties). Deterministic,
    and `default_palette(k)` is a prefix of `default_palette(k + 1)`, so
    adding a class keeps the colours of the others. ~20 ms for 150 classes.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"default_palette: num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    levels = np.arange(0, 256, PALETTE_GRID_STEP, dtype=np.int32)
    red, green, blue = (axis.ravel() for axis in np.meshgrid(levels, levels, levels, indexing="ij"))
    # Squared distance of every grid colour to the nearest colour taken so far (black first).
    nearest2 = red * red + green * green + blue * blue
    picked = np.empty((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        i = int(np.argmax(nearest2))
        picked[k] = red[i], green[i], blue[i]
        distance2 = (red - red[i]) ** 2
        distance2 += (green - green[i]) ** 2
        distance2 += (blue - blue[i]) ** 2
        np.minimum(nearest2, distance2, out=nearest2)
    picked.flags.writeable = False
    return picked


@dataclass(frozen=True, eq=False)
class Legend:
    """Ordered class names and their uint8 colours; class id = position.

    Build with `Legend.from_names`, `Legend.from_pairs` or `Legend.cityscapes`.
    `colors` is a read-only (K, 3) uint8 array. Legends compare equal when
    names and colours are equal, and are hashable.
    """

    names: tuple[str, ...]
    colors: np.ndarray

    def __post_init__(self) -> None:
        names = tuple(self.names)
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"Legend: class names must be non-empty strings, got {name!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Legend: duplicate class name(s) {duplicates}")
        if not 1 <= len(names) <= MAX_CLASSES:
            raise ValueError(f"Legend: needs 1..{MAX_CLASSES} classes, got {len(names)}")

        colors = np.asarray(self.colors)
        if colors.shape != (len(names), 3):
            raise ValueError(
                f"Legend: colors must have shape ({len(names)}, 3), one RGB per class; got {colors.shape}"
            )
        if colors.dtype.kind not in "iu":
            raise ValueError(f"Legend: colours must be integer RGB triples in 0..255, got dtype {colors.dtype}")
        out_of_range = [n for n, c in zip(names, colors.tolist()) if not all(0 <= v <= 255 for v in c)]
        if out_of_range:
            raise ValueError(f"Legend: colours of class(es) {out_of_range} are outside 0..255")
        colors = colors.astype(np.uint8)
        black = [n for n, c in zip(names, colors.tolist()) if tuple(c) == BLACK]
        if black:
            raise ValueError(
                f"Legend: class(es) {black} use black (0, 0, 0), which is reserved for 'anything else'"
            )
        by_colour: dict[tuple[int, ...], list[str]] = {}
        for name, colour in zip(names, colors.tolist()):
            by_colour.setdefault(tuple(colour), []).append(name)
        shared = {colour: group for colour, group in by_colour.items() if len(group) > 1}
        if shared:
            detail = "; ".join(f"{group} share {colour}" for colour, group in shared.items())
            raise ValueError(f"Legend: duplicate colours: {detail}")
        colors.flags.writeable = False
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colors", colors)

    # -- construction ------------------------------------------------------

    @classmethod
    def from_names(cls, names: Sequence[str], palette: str = "generated") -> Legend:
        """Colour `names` from a palette.

        palette="generated": `default_palette` (maximal separation, stable as
        classes are appended). palette="cityscapes": Cityscapes' official
        colours; every name must be a Cityscapes class.
        """
        names = list(names)
        if palette == "generated":
            return cls(names, default_palette(len(names)))
        if palette == "cityscapes":
            official = dict(CITYSCAPES)
            unknown = [n for n in names if n not in official]
            if unknown:
                raise ValueError(
                    f"Legend.from_names: {unknown} are not Cityscapes classes; "
                    f"known: {[n for n, _ in CITYSCAPES]}"
                )
            return cls(names, [official[n] for n in names])
        raise ValueError(f"Legend.from_names: unknown palette {palette!r}; use 'generated' or 'cityscapes'")

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, Sequence[int]]]) -> Legend:
        """From [(name, (r, g, b)), ...] in class-id order."""
        pairs = list(pairs)
        not_rgb = [name for name, colour in pairs if len(colour) != 3]
        if not_rgb:
            raise ValueError(f"Legend.from_pairs: colours of class(es) {not_rgb} are not (r, g, b) triples")
        return cls([name for name, _ in pairs], np.array([tuple(c) for _, c in pairs]).reshape(-1, 3))

    @classmethod
    def cityscapes(cls) -> Legend:
        """Cityscapes' 19 train-id classes (road = 0 ... bicycle = 18), official colours."""
        return cls.from_pairs(CITYSCAPES)

    def permuted(self, seed: int) -> Legend:
        """Same names in the same order (ids stay canonical), colours moved among classes.

        Pass `seed` = 1 .. K-1 rotates the colours by that many classes, so
        every class gets a different colour in each of the K legends 0 .. K-1
        (a Latin square): no two ensembling passes repeat a colour choice,
        however few classes there are. Seeds repeat with period K-1 after that.
        """
        k = len(self)
        shift = 0 if seed == 0 or k < 2 else (seed - 1) % (k - 1) + 1
        return Legend(self.names, np.roll(self.colors, -shift, axis=0))

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Legend):
            return NotImplemented
        return self.names == other.names and np.array_equal(self.colors, other.colors)

    def __hash__(self) -> int:
        return hash((self.names, self.colors.tobytes()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={tuple(c)}" for n, c in self.to_pairs()[:4])
        more = f", ... ({len(self)} classes)" if len(self) > 4 else ""
        return f"Legend({shown}{more})"

    @property
    def unlabelled(self) -> int:
        """The class id of pixels that match no class: 255, or 65535 past 255 classes."""
        return 255 if len(self) <= 255 else 65535

    @property
    def dtype(self) -> np.dtype:
        """dtype of decoded class ids: uint8, or uint16 past 255 classes."""
        return np.dtype(np.uint8 if len(self) <= 255 else np.uint16)

    def to_pairs(self) -> list[tuple[str, tuple[int, int, int]]]:
        """[(name, (r, g, b)), ...] with plain ints (JSON- and prompt-ready)."""
        return [(name, tuple(int(v) for v in colour)) for name, colour in zip(self.names, self.colors)]

    def min_separation(self) -> float:
        """Smallest Euclidean RGB distance between two class colours (inf for one class)."""
        return self._min_separation

    def class_separations(self) -> np.ndarray:
        """(K,) RGB distance from each class colour to the nearest other colour a pixel
        can decode to: another class's, or black. Half of it is the default `max_distance`."""
        return self._class_separations

    @functools.cached_property
    def _min_separation(self) -> float:
        if len(self) < 2:
            return math.inf
        from scipy.spatial import cKDTree

        colours = self.colors.astype(np.float64)
        distances, _ = cKDTree(colours).query(colours, k=2)
        return float(distances[:, 1].min())

    @functools.cached_property
    def _class_separations(self) -> np.ndarray:
        from scipy.spatial import cKDTree

        candidates = np.vstack([self.colors, np.array(BLACK, dtype=np.uint8)]).astype(np.float64)
        distances, _ = cKDTree(candidates).query(self.colors.astype(np.float64), k=2)
        separations = distances[:, 1]
        separations.flags.writeable = False
        return separations

    @functools.cached_property
    def _decode_order(self) -> np.ndarray:
        """Class ids in (r, g, b) colour order: the candidate order of the decode table."""
        return np.lexsort(self.colors.T[::-1])


def encode(class_ids: Any, legend: Legend) -> np.ndarray:
    """Paint class ids (any shape) as uint8 RGB; unlabelled or out-of-range ids paint black."""
    class_ids = np.asarray(class_ids)
    if class_ids.dtype.kind not in "iub":
        raise ValueError(f"segmentation.encode: class_ids must be integers, got dtype {class_ids.dtype}")
    palette = np.vstack([legend.colors, np.array(BLACK, dtype=np.uint8)])
    class_ids = class_ids.astype(np.int64)
    in_range = (class_ids >= 0) & (class_ids < len(legend))
    return palette[np.where(in_range, class_ids, len(legend))]


def decode(rgb: Any, legend: Legend, max_distance: float | None = None) -> Decoded:
    """Read class ids back from a painted image.

    Args:
        rgb: uint8 (H, W, 3) or (N, H, W, 3), or float32 in 0..255 (rounded to
            levels first); numpy or torch (decoded in torch on its device).
        legend: the legend the image was painted with.
        max_distance: RGB distance beyond which a pixel is unlabelled, for
            every class; None means per class,
            ``DEFAULT_MAX_DISTANCE_FRACTION * legend.class_separations()``;
            ``math.inf`` turns the threshold off.

    Returns:
        Decoded with `values` of `legend.dtype` (torch: uint8, or int32 past
        255 classes; `legend.unlabelled` where unlabelled) and float32
        `confidence` = ``1 - d1 / d2`` (0 where unlabelled).
    """
    if max_distance is not None and (
        not isinstance(max_distance, (int, float)) or math.isnan(max_distance) or max_distance < 0
    ):
        raise ValueError(
            f"segmentation.decode: max_distance must be None or a number >= 0 (or inf), got {max_distance!r}"
        )
    backend, pixels, lead_shape = painted_pixels(rgb, "segmentation")
    if str(pixels.dtype).removeprefix("torch.") == "float32":
        # NaN paints nothing: make it black, which is unlabelled.
        pixels = backend.xp.where(backend.xp.isnan(pixels), 0.0, backend.xp.round(pixels))
    order = legend._decode_order
    candidates = np.vstack([legend.colors[order], np.array(BLACK, dtype=np.uint8)])
    # Candidate index -> class id; the last candidate (black) is unlabelled.
    class_of = np.append(order, legend.unlabelled)
    if max_distance is None:
        radii = DEFAULT_MAX_DISTANCE_FRACTION * legend.class_separations()[order]
    else:
        radii = np.full(len(legend), float(max_distance))
    radii = np.append(radii, 0.0)  # black is unlabelled at any distance

    if backend.is_torch:
        nearest, confidence = _nearest_colours(backend, pixels, candidates, radii)
        ids_dtype = "uint8" if legend.dtype == np.uint8 else "int32"
        values = backend.asarray(class_of, "int64")[nearest]
        values = backend.astype(values, ids_dtype)
    else:
        class_of_entry = np.append(legend.unlabelled, class_of).astype(legend.dtype)

        def unpack(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # Entry: (candidate index + 1) << 16 | confidence in 1/65535 steps.
            values = np.take(class_of_entry, entries >> 16)
            return values, (entries & 0xFFFF).astype(np.float32) * np.float32(1 / 65535)

        fast, lookup = kernels.active(), None
        if fast is not None:
            step = np.float32(1 / 65535)
            lookup = kernels.table_lookup(fast.segmentation_lookup, (legend.dtype, np.float32), class_of_entry, step)

        table = _decode_table(candidates.tobytes(), radii.tobytes())
        values, confidence = table.decode(backend.astype(pixels, "uint8"), unpack, lookup)
    return Decoded(values=values.reshape(lead_shape), confidence=confidence.reshape(lead_shape))


def _nearest_colours(
    backend: ArrayBackend, pixels: Any, candidates: np.ndarray, radii: np.ndarray
) -> tuple[Any, Any]:
    """Exact nearest candidate per pixel and the confidence ``1 - d1 / d2``.

    The last candidate is black. A pixel whose nearest candidate is black, or
    is farther from it than that candidate's radius, gets the black index and
    confidence 0. Squared distances of 8-bit colours are integers below 2**24, so float32
    computes them exactly and ties are true ties (argmin keeps the first).
    """
    xp = backend.xp
    num_candidates = len(candidates)
    black = num_candidates - 1
    cand_red, cand_green, cand_blue = (backend.asarray(candidates[:, c], "float32") for c in range(3))
    candidate_index = backend.arange(num_candidates)
    radii2 = backend.asarray(radii**2, "float32")

    def nearest(red: Any, green: Any, blue: Any) -> tuple[Any, Any]:
        distance2 = (red[:, None] - cand_red) ** 2
        distance2 += (green[:, None] - cand_green) ** 2
        distance2 += (blue[:, None] - cand_blue) ** 2
        first = xp.argmin(distance2, axis=1)
        d1 = backend.take_along_last(distance2, first)
        d2 = xp.amin(xp.where(candidate_index == first[:, None], math.inf, distance2), axis=1)
        labelled = (first != black) & (d1 <= radii2[first])
        confidence = xp.where(labelled, 1.0 - xp.sqrt(d1) / xp.sqrt(d2), 0.0)
        return xp.where(labelled, first, black), confidence

    return decode_in_chunks(backend, pixels, nearest, elements_per_pixel=3 * num_candidates)


@functools.lru_cache(maxsize=4)
def _decode_table(candidate_bytes: bytes, radii_bytes: bytes) -> ColourTable:
    # Keyed by bytes so that legends with the same colour set (permutations) share a table.
    candidates = np.frombuffer(candidate_bytes, dtype=np.uint8).reshape(-1, 3)
    radii = np.frombuffer(radii_bytes, dtype=np.float64)
    bounds = block_bounds(candidates)
    return ColourTable(lambda keys: nearest_of_colours(keys, candidates, radii, bounds), np.uint32)


def vote(decodes: Sequence[Decoded], unlabelled: int | None = None) -> Decoded:
    """Per-pixel majority over the decodes of K ensemble passes.

    All `values` must have one shape and canonical ids (decode each pass
    with its own permuted legend). Ties in the count go to a labelled class
    over unlabelled, then to the lowest class id. Confidence is the vote
    share of the winner (count / K), 0 where the winner is unlabelled.
    `unlabelled` defaults to 255 for uint8 values and 65535 otherwise.
    """
    if not decodes:
        raise ValueError("vote: needs at least one Decoded")
    backend = backend_of(decodes[0].values)
    xp = backend.xp
    values = [d.values if backend.is_torch else np.asarray(d.values) for d in decodes]
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"vote: all decodes must have the same shape, got {sorted(shapes)}")
    if unlabelled is None:
        unlabelled = 255 if str(values[0].dtype).endswith("uint8") else 65535
    passes = backend.astype(xp.stack(values, axis=-1), "int32")
    num_passes = passes.shape[-1]
    counts = sum(backend.astype(passes == passes[..., j : j + 1], "int32") for j in range(num_passes))
    # Highest count, then labelled over unlabelled, then the lowest id: one integer score.
    labelled = backend.astype(passes != unlabelled, "int32")
    score = (counts * 2 + labelled) * 65536 + (65535 - passes)
    winner_pass = xp.argmax(score, axis=-1)
    winner = backend.take_along_last(passes, winner_pass)
    share = backend.astype(backend.take_along_last(counts, winner_pass), "float32") / num_passes
    confidence = xp.where(winner == unlabelled, 0.0, share)
    return Decoded(values=backend.astype(winner, str(values[0].dtype).removeprefix("torch.")), confidence=confidence)
