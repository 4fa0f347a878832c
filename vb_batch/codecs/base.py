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
    """A decode memoised over the 2**24 uint8 colours, filled on demand a block at a time; numpy only.

    The colours are cut into 32**3 blocks of 8x8x8 (`BLOCK_SIDE`), stored one
    after the other: a colour's entry is at its block id * 512 + its place in
    the block (`colour_keys`), so a block is one contiguous run (one page for
    8-byte entries) and nearby colours share pages. Entries are packed values
    of `dtype`, never 0: 0 marks a colour not computed yet.

    A pixel whose colour has no entry gets its whole block computed:
    `compute_blocks` maps a (B, 3) int32 array of block origins (multiples of
    8) to (B, 512) entries, red slowest within a block as `block_planes` lays
    them out; per colour a block costs less than colours one by one. Noise
    spreads a painting's colours around the walk or the legend, so the six
    blocks sharing a face with each new one are computed too when an image
    brings at most `NEIGHBOURS_UP_TO` new blocks (a painting's colours, or
    noise at their edge): images after the first one or two are then lookups
    only. More new blocks are colours spread thin (many classes' first image,
    a photo) and are computed alone. At worst every block is computed once,
    2**24 colours in all.

    The table is an anonymous memory map: zero pages reserved lazily by the OS,
    so memory grows only with the blocks filled, and (unlike numpy's huge-page
    allocations) a first write to a page that was read costs a 4 KB page, not
    2 MB. Each entry is one aligned word, and concurrent fills write identical
    words, so threads may share a table.
    """

    def __init__(self, compute_blocks: Callable[[np.ndarray], np.ndarray], dtype: Any) -> None:
        self.compute_blocks = compute_blocks
        dtype = np.dtype(dtype).newbyteorder("<")  # unpacked through little-endian views
        self.entries = np.frombuffer(mmap.mmap(-1, dtype.itemsize << 24), dtype=dtype)
        self.filled = np.zeros(NUM_BLOCKS, dtype=bool)

    def lookup(self, pixels: np.ndarray) -> np.ndarray:
        """The packed entries of (P, 3) uint8 pixels, filling the blocks of colours not seen before."""
        key = colour_keys(pixels)
        entries = self.entries[key]
        if not entries.all():
            missing = np.flatnonzero(entries == 0)
            self.fill(key[missing] >> BLOCK_BITS)
            entries[missing] = self.entries[key[missing]]
        return entries

    def fill(self, blocks: np.ndarray) -> None:
        """Compute and store every colour of the given block ids, and of the blocks sharing a face with them
        when the new blocks are few (see the class docstring)."""
        wanted = np.zeros(NUM_BLOCKS, dtype=bool)
        wanted[blocks] = True
        if np.count_nonzero(wanted & ~self.filled) <= NEIGHBOURS_UP_TO:
            wanted = wanted.reshape((NUM_BLOCKS_PER_SIDE,) * 3)
            around = wanted.copy()
            for axis in range(3):
                lower, upper = [slice(None)] * 3, [slice(None)] * 3
                lower[axis], upper[axis] = slice(None, -1), slice(1, None)
                around[tuple(lower)] |= wanted[tuple(upper)]
                around[tuple(upper)] |= wanted[tuple(lower)]
            wanted = around.reshape(-1)
        blocks = np.flatnonzero(wanted & ~self.filled)
        by_block = self.entries.reshape(NUM_BLOCKS, -1)
        for start in range(0, len(blocks), FILL_BLOCKS):
            part = blocks[start : start + FILL_BLOCKS]
            origins = np.stack([part >> 10, (part >> 5) & 31, part & 31], axis=1).astype(np.int32) * BLOCK_SIDE
            by_block[part] = self.compute_blocks(origins).reshape(len(part), -1)
            self.filled[part] = True


# Blocks of the colour table: 8 levels per channel, 32**3 blocks of 512 colours.
BLOCK_SIDE = 8
BLOCK_BITS = 9
NUM_BLOCKS_PER_SIDE = 256 // BLOCK_SIDE
NUM_BLOCKS = NUM_BLOCKS_PER_SIDE**3
# Blocks computed per call of `compute_blocks` (bounds its temporaries).
FILL_BLOCKS = 128
# More new blocks than this at once are colours spread thin: filled without their neighbours.
NEIGHBOURS_UP_TO = 512

# A channel's level -> its bits of the table index: the block coordinate (level // 8) among the block id's
# bits, and the place in the block (level % 8) among the low 9 bits, red slowest in both.
_levels = np.arange(256, dtype=np.int32)
_KEY_BITS = tuple(
    ((_levels >> 3) << (BLOCK_BITS + 5 * (2 - channel))) | ((_levels & 7) << (3 * (2 - channel)))
    for channel in range(3)
)


def colour_keys(pixels: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 pixels -> int32 table indices: block id (r//8, g//8, b//8) * 512 + place (r%8, g%8, b%8)."""
    key = np.take(_KEY_BITS[0], pixels[:, 0])
    key |= np.take(_KEY_BITS[1], pixels[:, 1])
    key |= np.take(_KEY_BITS[2], pixels[:, 2])
    return key


def block_planes(origins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, 3) block origins -> float32 red (B, 8, 1, 1), green (B, 1, 8, 1) and blue (B, 1, 1, 8) levels.

    Broadcast together they are the blocks' colours in table order (red slowest): an
    element-wise kernel run on them computes each block as (B, 8, 8, 8).
    """
    levels = (origins[:, :, None] + np.arange(BLOCK_SIDE, dtype=np.int32)).astype(np.float32)  # (B, 3, 8)
    return levels[:, 0, :, None, None], levels[:, 1, None, :, None], levels[:, 2, None, None, :]


def full_shape(origins: np.ndarray) -> tuple[int, int, int, int]:
    """The (B, 8, 8, 8) shape of the colours of B blocks."""
    return (len(origins), BLOCK_SIDE, BLOCK_SIDE, BLOCK_SIDE)
