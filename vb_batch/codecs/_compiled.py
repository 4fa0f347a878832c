"""The numba kernels behind `vb_batch.codecs.kernels` (import that module, not this one: it decides when these run).

Every kernel mirrors a numpy computation of the codecs and is tested bit for bit
against it. Literals are typed (np.uint64(32), np.float32(...)) on purpose: numba,
like numpy, would promote a uint64 mixed with an int64 to float64, and a float32
mixed with a Python float to float64.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True, "boundscheck": False}


@numba.njit(**_JIT)
def table_key(red: int, green: int, blue: int) -> int:
    """`codecs.base.colour_keys` of one colour: block id (r//8, g//8, b//8) * 512 + place (r%8, g%8, b%8)."""
    return ((red >> 3) << 19) | ((green >> 3) << 14) | ((blue >> 3) << 9) | ((red & 7) << 6) | ((green & 7) << 3) | (blue & 7)


@numba.njit(**_JIT)
def pixel_at(only, k: int) -> int:
    """The k-th pixel a lookup visits: k itself, or `only[k]` when the lookup goes over given pixels."""
    return only[k] if only.shape[0] else k


@numba.njit(**_JIT)
def note_missing(key: int, i: int, seen, missing_keys, missing_at, counts) -> None:
    """Pixel i's colour has no entry: keep its index, and its key the first time the lookup meets it
    (`seen`: one bit per table key), so that the fill gets each missing colour once, without a sort of all
    the pixels' keys. `counts` holds (pixels missing, distinct keys missing)."""
    missing_at[counts[0]] = i
    counts[0] += 1
    bit = np.uint8(1 << (key & 7))
    if not seen[key >> 3] & bit:
        seen[key >> 3] |= bit
        missing_keys[counts[1]] = key
        counts[1] += 1


@numba.njit(**_JIT)
def forget_seen(seen, missing_keys, counts) -> None:
    """Clear the bits `note_missing` set, so that `seen` (kept per thread) is all zeros for the next lookup."""
    for n in range(counts[1]):
        seen[missing_keys[n] >> 3] = 0


@numba.njit(**_JIT)
def depth_lookup(pixels, only, entries, depth_bits, confidence_bits, seen, missing_keys, missing_at, counts) -> None:
    """Unpack each (P, 3) uint8 pixel's uint64 entry into the float32 bits of depth and confidence
    (`depth._unpack`), over every pixel or the pixels `only` lists; pixels whose entry is 0 (not computed
    yet) go through `note_missing`."""
    high = np.uint64(32)
    low = np.uint64(0xFFFFFFFF)
    for k in range(only.shape[0] or pixels.shape[0]):
        i = pixel_at(only, k)
        key = table_key(np.intp(pixels[i, 0]), np.intp(pixels[i, 1]), np.intp(pixels[i, 2]))
        entry = entries[key]
        depth_bits[i] = np.uint32(~(entry >> high) & low)
        confidence_bits[i] = np.uint32(~entry & low)
        if entry == 0:
            note_missing(key, i, seen, missing_keys, missing_at, counts)
    forget_seen(seen, missing_keys, counts)


@numba.njit(**_JIT)
def segmentation_lookup(
    pixels, only, entries, class_of_entry, step, values, confidence, seen, missing_keys, missing_at, counts
) -> None:
    """Unpack each pixel's uint32 entry, (candidate index + 1) << 16 | confidence steps, into its class id
    and float32 confidence (steps * `step`, as `segmentation.decode`'s unpack), as `depth_lookup` does."""
    shift = np.uint32(16)
    low = np.uint32(0xFFFF)
    for k in range(only.shape[0] or pixels.shape[0]):
        i = pixel_at(only, k)
        key = table_key(np.intp(pixels[i, 0]), np.intp(pixels[i, 1]), np.intp(pixels[i, 2]))
        entry = entries[key]
        values[i] = class_of_entry[entry >> shift]
        confidence[i] = np.float32(entry & low) * step
        if entry == 0:
            note_missing(key, i, seen, missing_keys, missing_at, counts)
    forget_seen(seen, missing_keys, counts)


@numba.njit(**_JIT)
def key_levels(key: int) -> tuple:
    """`codecs.base.key_colours` of one table key: its colour's float32 red, green and blue levels."""
    red = ((key >> 19) & 31) << 3 | ((key >> 6) & 7)
    green = ((key >> 14) & 31) << 3 | ((key >> 3) & 7)
    blue = ((key >> 9) & 31) << 3 | (key & 7)
    return np.float32(red), np.float32(green), np.float32(blue)


@numba.njit(**_JIT)
def depth_walk(keys, starts, directions, steps, tie_margin, best_remaining, best_distance2) -> None:
    """The walk step of `depth._depth_steps` for table keys' colours: per edge e, the offsets from its start,
    t = clip(sum of offset * step over the channels it moves along, 0, 1), the squared distance to the point t
    along it, remaining = (edges - e) - t; the earlier edge keeps a tie within `tie_margin`. Sums start at 0 and
    run in channel order, as Python's sum over numpy arrays does."""
    num_edges = starts.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for k in range(keys.shape[0]):
        planes = key_levels(keys[k])
        remaining_k = zero
        distance2_k = zero
        for e in range(num_edges):
            along = zero
            for c in range(3):
                if directions[e, c] != 0:
                    along = along + (planes[c] - starts[e, c]) * steps[e, c]
            t = min(max(along, zero), one)
            distance2 = zero
            for c in range(3):
                offset = planes[c] - starts[e, c]
                if directions[e, c] != 0:
                    offset = offset - t * directions[e, c]
                distance2 = distance2 + offset * offset
            remaining = np.float32(num_edges - e) - t
            if e == 0:
                remaining_k, distance2_k = remaining, distance2
            else:
                if distance2 < distance2_k * tie_margin:
                    remaining_k = remaining
                distance2_k = min(distance2, distance2_k)
        best_remaining[k] = remaining_k
        best_distance2[k] = distance2_k


@numba.njit(**_JIT)
def nearest_by_block(keys, coordinates, radii2, nearest_bound, farthest_bound, kept, packed) -> None:
    """`block_search.nearest_of_colours` of table keys, packed: each run of keys in one 8x8x8 block searches the
    candidates that can be nearest or runner-up in that block (those whose nearest point of the block is no
    farther than the second-smallest farthest distance of any candidate), in id order, with `nearest_among`'s
    running minimum and packing. Keys sorted (as `ColourTable.fill` hands them) list each block once.
    `*_bound` are `block_search.block_bounds` stacked (3, 32, C); `kept` is room for C candidate ids."""
    num_candidates = radii2.shape[0]
    black = num_candidates - 1
    one = np.float32(1.0)
    steps = np.float32(65535.0)
    start = 0
    while start < keys.shape[0]:
        block = keys[start] >> 9
        x, y, z = block >> 10, (block >> 5) & 31, block & 31
        smallest = second = np.iinfo(np.int32).max
        for c in range(num_candidates):
            far = farthest_bound[0, x, c] + farthest_bound[1, y, c] + farthest_bound[2, z, c]
            if far < smallest:
                second = smallest
                smallest = far
            elif far < second:
                second = far
        width = 0
        for c in range(num_candidates):
            if nearest_bound[0, x, c] + nearest_bound[1, y, c] + nearest_bound[2, z, c] <= second:
                kept[width] = c
                width += 1
        end = start
        while end < keys.shape[0] and keys[end] >> 9 == block:
            r, g, b = key_levels(keys[end])
            d1 = np.float32(np.inf)
            d2 = np.float32(np.inf)
            nearest = 0
            for j in range(width):
                c = kept[j]
                dr = r - coordinates[c, 0]
                dg = g - coordinates[c, 1]
                db = b - coordinates[c, 2]
                distance2 = (dr * dr + dg * dg) + db * db  # exact integers below 2**24
                if distance2 < d1:
                    nearest = c
                d2 = min(d2, max(distance2, d1))
                d1 = min(d1, distance2)
            confidence = np.float32(0.0)
            if nearest != black and d1 <= radii2[nearest]:
                confidence = one - np.sqrt(d1) / np.sqrt(d2)
            else:
                nearest = black
            packed[end] = (np.uint32(nearest + 1) << np.uint32(16)) | np.uint32(np.rint(confidence * steps))
            end += 1
        start = end


@numba.njit(**_JIT)
def normals_unit(pixels, signs, constants, values, exponent) -> None:
    """`normals.decode`'s unit_vectors for (P, 3) uint8 pixels, into (P, 3) `values` in the frame of `signs`;
    `exponent` gets the confidence's exp argument (-inf where the colour has no direction, whose exp is the 0
    numpy's where writes), so that numpy's own exp finishes the confidence with the same bits. `constants` are
    float32 (2 / 255, MIN_NORM, QUANTISATION_SLACK, -0.5 / NORM_SIGMA**2), as numpy rounds the Python floats."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    to_raw, min_norm, slack, factor = constants[0], constants[1], constants[2], constants[3]
    for i in range(pixels.shape[0]):
        x = np.float32(pixels[i, 0]) * to_raw - one
        y = np.float32(pixels[i, 1]) * to_raw - one
        z = np.float32(pixels[i, 2]) * to_raw - one
        length = np.sqrt((x * x + y * y) + z * z)
        if length >= min_norm:
            scale = one / max(length, min_norm)
            excess = max(abs(length - one) - slack, zero)
            exponent[i] = excess * excess * factor
        else:
            scale = np.float32(np.nan)
            exponent[i] = -np.inf
        values[i, 0] = x * (scale if signs[0] == 1 else -scale)
        values[i, 1] = y * (scale if signs[1] == 1 else -scale)
        values[i, 2] = z * (scale if signs[2] == 1 else -scale)
