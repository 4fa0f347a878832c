"""What the colour codecs share: the `Decoded` result and the numpy/torch dispatch.

Every decoder is written once against a small array namespace `xp` (numpy or
torch, whose element-wise functions share names), so a torch tensor is decoded
in torch on its own device and a numpy array in numpy, by the same lines of
code. `ArrayBackend` holds the handful of operations the two libraries spell
differently. torch stays optional: it is never imported here, only recognised
when the caller already passed a tensor.
"""

from __future__ import annotations

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
    """A decode memoised over the 2**24 uint8 colours, filled on demand; numpy only.

    `compute(colours)` maps a (K, 3) uint8 array of distinct colours to K
    packed entries of `dtype`, none of them 0: 0 marks a colour not computed
    yet. The zeroed array is reserved lazily by the OS, so memory grows only
    with the colours actually seen (at most 2**24 entries). Each entry is one
    aligned word, and concurrent fills write identical words, so threads may
    share a table.
    """

    def __init__(self, compute: Callable[[np.ndarray], np.ndarray], dtype: Any) -> None:
        self.compute = compute
        self.entries = np.zeros(1 << 24, dtype=dtype)

    def lookup(self, pixels: np.ndarray) -> np.ndarray:
        """The packed entries of (P, 3) uint8 pixels, computing the colours not seen before."""
        key = pixels[:, 0].astype(np.int32) << 16
        key |= pixels[:, 1].astype(np.int32) << 8
        key |= pixels[:, 2]
        entries = self.entries[key]
        missing = entries == 0
        if missing.any():
            new_keys = distinct(key[missing])
            new_colours = np.stack([new_keys >> 16, (new_keys >> 8) & 255, new_keys & 255], axis=1).astype(np.uint8)
            self.entries[new_keys] = self.compute(new_colours)
            entries[missing] = self.entries[key[missing]]
        return entries


def distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct 24-bit colour keys, sorted: by a 2**24-entry mask for many keys (~10x faster than np.unique)."""
    if len(keys) < 1 << 16:
        return np.unique(keys)
    seen = np.zeros(1 << 24, dtype=bool)
    seen[keys] = True
    return np.flatnonzero(seen)
