"""Segmentation's exact nearest-colour search for the colours of a table fill, pruned per 8x8x8 block (numpy).

`nearest_of_colours` fills `ColourTable` entries for `segmentation.decode`: for each
colour, the nearest candidate (legend colours in (r, g, b) order, then black),
whether it is labelled (within that candidate's radius; black never is) and the
confidence ``1 - d1 / d2``, packed as the table stores them. It returns exactly
what `segmentation._nearest_colours` (the brute force over every candidate, still
the torch path) returns, bit for bit: squared distances of 8-bit colours are
integers below 2**24, exact in float32, and ties go to the lowest candidate id as
argmin's do.

It is faster because a colour searches only the few candidates that can be
nearest or runner-up anywhere in its 8x8x8 block of colours (~8 of 151 for 150
classes), a list computed once per block from per-channel bounds.
"""

from __future__ import annotations

import numpy as np

from vb_batch.codecs import kernels
from vb_batch.codecs.base import BLOCK_BITS, BLOCK_SIDE, key_colours


def pack_nearest(nearest: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Table entries: (candidate index + 1) << 16 | confidence in 1/65535 steps (never 0)."""
    packed = (nearest.astype(np.uint32) + 1) << 16
    packed |= np.rint(confidence * 65535).astype(np.uint32)
    return packed


# Where a block's padded candidate list points past its real candidates: a colour
# farther from every 8-bit colour than any candidate, whose squared distances
# (< 2**24) float32 still holds exactly.
FAR_AWAY = 1024.0


def nearest_of_colours(keys: np.ndarray, candidates: np.ndarray, radii: np.ndarray, bounds: tuple) -> np.ndarray:
    """`segmentation._nearest_colours` of table keys' colours, packed; numpy, the same float32 values bit for bit.

    Per block only candidates that can be a colour's nearest or runner-up are
    searched: one whose nearest point of the block is farther than the
    second-smallest farthest distance of any candidate is beaten, for every
    colour of the block, by two others, strictly. Those kept stay in id order,
    so ties go as in the full search, and the distances are the same exact
    integers in float32. `bounds` is `block_bounds(candidates)`; the pruning
    runs in steps of ~2**20 block-candidate pairs.
    """
    fast = kernels.active()
    if fast is not None:  # the same search, compiled: block by block, over keys in block order
        packed = np.empty(len(keys), np.uint32)
        nearest, farthest = (np.stack(bound) for bound in bounds)
        kept = np.empty(len(candidates), np.int32)
        fast.nearest_by_block(keys, *search_arrays(candidates, radii), nearest, farthest, kept, packed)
        return packed
    block_of_key = keys >> BLOCK_BITS  # the table's blocks are the pruning's
    present = np.zeros(32**3, bool)
    present[block_of_key] = True
    blocks = np.flatnonzero(present)
    place = np.zeros(32**3, np.int32)
    place[blocks] = np.arange(len(blocks), dtype=np.int32)
    slabs = np.stack([blocks >> 10, (blocks >> 5) & 31, blocks & 31], axis=1)
    blocks_per_step = max(1, (1 << 20) // len(candidates))
    lists = [
        candidates_per_block(slabs[start : start + blocks_per_step], bounds)
        for start in range(0, len(slabs), blocks_per_step)
    ]
    width = max(part.shape[1] for part in lists)
    padded = [np.pad(part, ((0, 0), (0, width - part.shape[1])), constant_values=len(candidates)) for part in lists]
    lists = np.concatenate(padded)
    # Each colour searches its block's list: colours grouped by the list's length, each group as wide as its
    # lists (most blocks keep far fewer candidates than the widest).
    block_of_colour = place[block_of_key]
    length = np.count_nonzero(lists < len(candidates), axis=1)[block_of_colour]
    red, green, blue = key_colours(keys)
    packed = np.empty(len(keys), np.uint32)
    for width in np.flatnonzero(np.bincount(length)):
        group = np.flatnonzero(length == width)
        searched = lists[block_of_colour[group], :width]
        packed[group] = nearest_among((red[group], green[group], blue[group]), searched, candidates, radii)
    return packed


def block_bounds(candidates: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Per channel, (32, C) squared distances along it from each block slab (8 levels) to each candidate:
    to the slab's nearest level, and to its farthest."""
    low = np.arange(0, 256, BLOCK_SIDE, dtype=np.int32)[:, None]
    high = low + (BLOCK_SIDE - 1)
    nearest, farthest = [], []
    for level in candidates.T.astype(np.int32):
        outside = np.maximum(low - level, 0) + np.maximum(level - high, 0)
        reach = np.maximum(np.abs(level - low), np.abs(level - high))
        nearest.append(outside * outside)
        farthest.append(reach * reach)
    return tuple(nearest), tuple(farthest)


def candidates_per_block(slabs: np.ndarray, bounds: tuple) -> np.ndarray:
    """(B, 3) block coordinates (origin // 8) -> (B, W) ids of the candidates each must search,
    in id order, padded with C (one past the last id)."""
    nearest, farthest = bounds
    nearest2 = nearest[0][slabs[:, 0]] + nearest[1][slabs[:, 1]] + nearest[2][slabs[:, 2]]
    farthest2 = farthest[0][slabs[:, 0]] + farthest[1][slabs[:, 1]] + farthest[2][slabs[:, 2]]
    keep = nearest2 <= np.partition(farthest2, 1, axis=1)[:, 1:2]  # at least the two of smallest farthest2
    # Kept ids first, in id order (nonzero goes row by row, ids ascending), then the padding.
    counts = np.count_nonzero(keep, axis=1)
    rows, ids = np.nonzero(keep)
    place = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    lists = np.full((len(keep), int(counts.max())), keep.shape[1], np.int32)
    lists[rows, place] = ids
    return lists


def search_arrays(candidates: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C + 1, 3) float32 candidate levels, the padding's `FAR_AWAY` colour last, and (C,) float32 squared radii."""
    coordinates = np.vstack([candidates.astype(np.float32), np.full((1, 3), FAR_AWAY, np.float32)])
    return coordinates, np.asarray(radii**2, dtype=np.float32)


def nearest_among(colours: tuple, searched: np.ndarray, candidates: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Packed nearest candidate and confidence of (K,) float32 red, green, blue levels, searching `searched` (K, W).

    A running minimum over the (few) searched candidates, in id order: a strictly closer
    candidate takes over, so ties stay with the lower id as argmin's first wins, and the
    runner-up distance min(d2, max(d1, d)) counts a tied candidate as the full search does.
    """
    black = len(candidates) - 1
    red, green, blue = colours
    coordinates, radii2 = search_arrays(candidates, radii)
    shape = red.shape
    d1 = np.full(shape, np.inf, np.float32)
    d2 = np.full(shape, np.inf, np.float32)
    nearest = np.zeros(shape, np.int32)
    distance2, runner_up = np.empty(shape, np.float32), np.empty(shape, np.float32)
    closer = np.empty(shape, bool)
    for column in range(searched.shape[1]):
        ids = searched[:, column]
        r, g, b = (np.take(coordinates[:, channel], ids) for channel in range(3))
        np.add((red - r) ** 2 + (green - g) ** 2, (blue - b) ** 2, out=distance2)  # exact integers
        np.less(distance2, d1, out=closer)
        np.copyto(nearest, ids, where=closer)
        np.minimum(d2, np.maximum(distance2, d1, out=runner_up), out=d2)
        np.minimum(d1, distance2, out=d1)
    labelled = (nearest != black) & (d1 <= radii2[nearest])
    confidence = np.where(labelled, 1.0 - np.sqrt(d1) / np.sqrt(d2), 0.0)
    return pack_nearest(np.where(labelled, nearest, black), confidence)
