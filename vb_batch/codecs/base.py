"""What the colour codecs share: the `Decoded` result and the numpy/torch dispatch.

Every decoder is written once against a small array namespace `xp` (numpy or
torch, whose element-wise functions share names), so a torch tensor is decoded
in torch on its own device and a numpy array in numpy, by the same lines of
code. `ArrayBackend` holds the handful of operations the two libraries spell
differently. torch stays optional: it is never imported here, only recognised
when the caller already passed a tensor.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np

from vb_batch.codecs.kernels import EVERY_PIXEL

# Working-set budget (array elements) of one chunk of pixels. On a CPU it keeps
# a chunk's temporaries in cache (measured ~1.3x faster than whole-image passes
# for depth and segmentation) and bounds memory for any image size; a GPU
# wants big launches.
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Decoded:
    """Decoded values and their per-pixel confidence in [0, 1].

    Both are numpy arrays, or torch tensors on the input's device when the
    painted image was a torch tensor.
    """

    values: Any
    confidence: Any


def is_torch_tensor(x: Any) -> bool:
    """True for a torch tensor, without importing torch when nobody has."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class ArrayBackend:
    """numpy or torch, plus where new arrays go (the input tensor's device)."""

    xp: ModuleType
    device: Any = None

    @property
    def is_torch(self) -> bool:
        return self.xp is not np

    @property
    def chunk_elements(self) -> int:
        on_gpu = self.is_torch and self.device.type != "cpu"
        return GPU_CHUNK_ELEMENTS if on_gpu else CPU_CHUNK_ELEMENTS

    def dtype(self, name: str) -> Any:
        """The backend's dtype called `name` ("float32", "uint8", ...)."""
        return getattr(self.xp, name)

    def asarray(self, values: Any, dtype: str) -> Any:
        if self.is_torch:
            return self.xp.as_tensor(values, dtype=self.dtype(dtype), device=self.device)
        return np.asarray(values, dtype=dtype)

    def astype(self, x: Any, dtype: str) -> Any:
        if self.is_torch:
            return x.to(self.dtype(dtype))
        return x.astype(dtype, copy=False)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        if self.is_torch:
            return self.xp.empty(shape, dtype=dtype, device=self.device)
        return np.empty(shape, dtype=dtype)

    def arange(self, n: int) -> Any:
        if self.is_torch:
            return self.xp.arange(n, device=self.device)
        return np.arange(n)

    def channel_planes(self, pixels: Any) -> tuple[Any, Any, Any]:
        """(n, 3) pixels -> three contiguous float32 planes (fast element-wise loops)."""
        if self.is_torch:
            planes = pixels.T.to(self.xp.float32).contiguous()
        else:
            planes = np.ascontiguousarray(pixels.T, dtype=np.float32)
        return planes[0], planes[1], planes[2]

    def take_along_last(self, x: Any, index: Any) -> Any:
        """x[..., index[...]] for an index with one entry per row of x."""
        if self.is_torch:
            return self.xp.take_along_dim(x, index[..., None], dim=-1)[..., 0]
        return np.take_along_axis(x, index[..., None], axis=-1)[..., 0]


def backend_of(x: Any) -> ArrayBackend:
    if is_torch_tensor(x):
        return ArrayBackend(sys.modules["torch"], x.device)
    return ArrayBackend(np)


def painted_pixels(rgb: Any, codec: str) -> tuple[ArrayBackend, Any, tuple[int, ...]]:
    """Check a painted image and flatten it to pixels.

    `rgb` is uint8 (H, W, 3) or batched (N, H, W, 3), or float32 in 0..255
    (a generator's raw output before it is rounded to bytes; values outside
    0..255 are clipped as saving to 8 bits would, NaN stays NaN). Returns the
    backend, the pixels as a (num_pixels, 3) array of the input dtype, and the
    leading shape to give the decoded values back.
    """
    backend = backend_of(rgb)
    if not backend.is_torch:
        rgb = np.asarray(rgb)
    dtype_name = str(rgb.dtype).removeprefix("torch.")
    if dtype_name not in ("uint8", "float32"):
        raise ValueError(
            f"{codec}.decode: rgb has dtype {dtype_name}; expected uint8 "
            "(a painted image) or float32 in 0..255 (raw generator output). "
            "Convert first, e.g. rgb.astype(np.uint8) or tensor.to(torch.float32)."
        )
    if rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
        raise ValueError(
            f"{codec}.decode: rgb has shape {tuple(rgb.shape)}; expected (H, W, 3) "
            "or a batch (N, H, W, 3)."
        )
    lead_shape = tuple(rgb.shape[:-1])
    pixels = rgb.reshape(-1, 3)
    if dtype_name == "float32":
        pixels = backend.xp.clip(pixels, 0.0, 255.0)
    return backend, pixels, lead_shape


def decode_in_chunks(
    backend: ArrayBackend,
    pixels: Any,
    decode_chunk: Callable[..., tuple[Any, ...]],
    elements_per_pixel: int = 16,
) -> tuple[Any, ...]:
    """Run `decode_chunk(red, green, blue)` over float32 colour planes, chunk by chunk.

    `decode_chunk` gets three 1-D float32 arrays (0..255) of one chunk and
    returns a tuple of 1-D per-pixel results; they are written into whole-image
    outputs. `elements_per_pixel` is how many array elements the kernel keeps
    alive per pixel; it sizes chunks to the backend's working-set budget.
    """
    num_pixels = pixels.shape[0]
    chunk = max(256, backend.chunk_elements // elements_per_pixel)

    if num_pixels <= chunk:
        return decode_chunk(*backend.channel_planes(pixels))
    outputs = None
    for start in range(0, num_pixels, chunk):
        results = decode_chunk(*backend.channel_planes(pixels[start : start + chunk]))
        if outputs is None:
            outputs = tuple(backend.empty((num_pixels,), r.dtype) for r in results)
        for out, result in zip(outputs, results):
            out[start : start + chunk] = result
    return outputs


class ColourTable:
    """A decode memoised over the 2**24 uint8 colours, filled on demand for the colours seen; numpy only.

    Layout: the colours are cut into 32**3 blocks of 8x8x8 (`BLOCK_SIDE`), stored
    one after the other: a colour's entry is at its block id * 512 + its place in
    the block (`colour_keys`), so the colours of a painting, which cluster around
    the depth walk or the legend colours, share pages (one 4 KB page is a block
    of 8-byte entries). Entries are packed values of `dtype`, never 0: 0 marks a
    colour not computed yet.

    Filling: `compute_colours` maps sorted, distinct int32 table keys (decode
    them with `key_colours`) to their entries. A lookup computes exactly the
    colours of the image that have no entry yet, found by sorting the keys of
    the pixels that missed (a sort of 32-bit keys costs a few ns per pixel),
    so a first image costs its distinct colours once, and later images only
    their new ones. At worst every colour is computed once, 2**24 in all.

    Memory: the table is an anonymous memory map, zero pages reserved lazily
    by the OS, so it holds only the pages of colours seen (at most 2**24
    entries: 128 MB of 8-byte entries, 64 MB of 4-byte ones, per table; the
    codecs keep a few tables per process, see their `_decode_table`). Unlike
    numpy's own zeroed arrays of that size, which ask for 2 MB huge pages, a
    first write to a page costs 4 KB, not 2 MB. Each entry is one aligned word
    and concurrent fills write identical words, so threads may share a table.
    """

    def __init__(self, compute_colours: Callable[[np.ndarray], np.ndarray], dtype: Any) -> None:
        self.compute_colours = compute_colours
        dtype = np.dtype(dtype).newbyteorder("<")  # unpacked through little-endian views
        self.entries = np.frombuffer(mmap.mmap(-1, dtype.itemsize << 24), dtype=dtype)

    def decode(
        self,
        pixels: np.ndarray,
        unpack: Callable[[np.ndarray], tuple[np.ndarray, ...]],
        lookup: Callable[..., tuple[tuple[np.ndarray, ...], Any]] | None = None,
    ) -> tuple[Any, ...]:
        """`unpack` of the entries of (P, 3) uint8 pixels as whole-image arrays, computing the colours not seen before.

        `unpack` maps packed entries to a tuple of per-pixel arrays. Pixels go in chunks of `LOOKUP_PIXELS`, whose
        temporaries stay in cache (measured ~1.3x faster than whole-image passes at 1024 x 1024). A chunk with
        colours not in the table waits, so that the colours missing anywhere in the image are computed in one
        `fill` (each call has a fixed cost), then its gaps are looked up.

        `lookup`, a compiled kernel's wrapper (`codecs.kernels`), does the lookup and the unpacking in one pass
        instead: `lookup(pixels, entries, only, outputs)` -> (the unpacked arrays, a `kernels.Missed`), over the
        pixels `only` lists (all for `kernels.EVERY_PIXEL`), into `outputs` (new arrays for None). The distinct
        colours it missed are filled, then its missed pixels are looked up again, in place.
        """
        if lookup is not None:
            pixels = np.ascontiguousarray(pixels)
            outputs, missed = lookup(pixels, self.entries, EVERY_PIXEL, None)
            if missed.counts[0]:
                self.fill(missed.distinct_keys())
                lookup(pixels, self.entries, missed.pixels(), outputs)
            return outputs
        num_pixels = len(pixels)
        outputs: tuple[np.ndarray, ...] | None = None
        waiting, missing = [], []

        def write(start: int, results: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
            if num_pixels <= LOOKUP_PIXELS:
                return results
            found = outputs or tuple(np.empty((num_pixels,) + r.shape[1:], r.dtype) for r in results)
            for out, result in zip(found, results):
                out[start : start + LOOKUP_PIXELS] = result
            return found

        for start in range(0, num_pixels, LOOKUP_PIXELS):
            key = colour_keys(pixels[start : start + LOOKUP_PIXELS])
            entries = np.take(self.entries, key)
            if entries.all():
                outputs = write(start, unpack(entries))
            else:
                gaps = np.flatnonzero(entries == 0)
                waiting.append((start, entries, gaps))
                missing.append(key[gaps])
        if missing:
            self.fill(np.concatenate(missing))
            for (start, entries, gaps), keys in zip(waiting, missing):
                entries[gaps] = np.take(self.entries, keys)
                outputs = write(start, unpack(entries))
        if outputs is None:  # no pixels
            outputs = unpack(np.zeros(0, self.entries.dtype))
        return outputs

    def fill(self, keys: np.ndarray) -> None:
        """Compute and store the entries of table keys (repeats allowed)."""
        keys = np.sort(keys)
        distinct = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        for start in range(0, len(distinct), FILL_COLOURS):
            part = distinct[start : start + FILL_COLOURS]
            self.entries[part] = self.compute_colours(part)


# Pixels per chunk of `ColourTable.decode`.
LOOKUP_PIXELS = 1 << 16
# Colours computed per call of `compute_colours` (bounds its temporaries).
FILL_COLOURS = 1 << 16

# Blocks of the colour table: 8 levels per channel, 32**3 blocks of 512 colours.
BLOCK_SIDE = 8
BLOCK_BITS = 9

# A channel's level -> its bits of the table index: the block coordinate (level // 8) among the block id's
# bits, and the place in the block (level % 8) among the low 9 bits, red slowest in both.
_levels = np.arange(256, dtype=np.int32)
_KEY_BITS = tuple(
    ((_levels >> 3) << (BLOCK_BITS + 5 * (2 - channel))) | ((_levels & 7) << (3 * (2 - channel)))
    for channel in range(3)
)
# Red and green together, indexed by the little-endian uint16 red | green << 8: one gather for two channels.
_RED_GREEN_KEY_BITS = (_KEY_BITS[0][None, :] | _KEY_BITS[1][:, None]).reshape(-1)


def colour_keys(pixels: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 pixels -> int32 table indices: block id (r//8, g//8, b//8) * 512 + place (r%8, g%8, b%8)."""
    if pixels.strides[1] != 1:
        pixels = np.ascontiguousarray(pixels)
    red_green = pixels[:, :2].view("<u2")[:, 0]  # a strided view: no copy
    key = np.take(_RED_GREEN_KEY_BITS, red_green)
    key |= np.take(_KEY_BITS[2], pixels[:, 2])
    return key


def key_colours(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table keys -> their colours' float32 red, green and blue levels (0..255), the inverse of `colour_keys`."""
    planes = []
    for channel in range(3):
        block_coordinate = (keys >> (BLOCK_BITS + 5 * (2 - channel))) & 31
        place = (keys >> (3 * (2 - channel))) & 7
        planes.append(((block_coordinate << 3) | place).astype(np.float32))
    return planes[0], planes[1], planes[2]

