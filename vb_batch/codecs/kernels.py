"""Compiled loops (numba) for the colour tables' per-pixel work; numpy code stays the fallback and the reference.

The numpy path of a table lookup makes about eight passes over a chunk of
pixels (the table key from two gathers and an or, the gather of the entries,
the check for new colours, the unpacking); these kernels do it in one pass per
pixel that reads its three bytes, gathers its entry and writes the decoded
values, and segmentation's table fill searches each new colour's few
candidates in one loop instead of a numpy pass per candidate. normals, which
has no table, is computed in one pass per pixel as well (numpy's exp finishes
its confidence). They compute
the same IEEE float32 operations in the same order as the numpy code they
replace, so the results are the same bits (tests decode through both).

numba is a dependency of vb_batch. Loading it costs a process about 0.7 s
(numba's own start-up, then the kernels from its cache; the first process of
an install also compiles them, a few seconds), which is worth it only past
some volume: at 3 to 20 ns saved per pixel, tens of millions of pixels. So by
default (``VB_BATCH_CODEC_KERNELS=auto``) a process decodes its first
`COMPILE_AFTER_PIXELS` pixels with numpy, then loads the kernels once and uses
them from then on; a small job never pays for them, an archive job pays once
per worker process. ``compiled`` loads them at the first decode,
``numpy`` never. numpy also runs where numba cannot be imported, where its JIT
is off (``NUMBA_DISABLE_JIT=1`` would run these loops as Python, per pixel), or
where it cannot compile or cache (a warning says why). The kernels release the
GIL, so row threads decode in parallel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

ENV_VAR = "VB_BATCH_CODEC_KERNELS"
MODES = ("auto", "compiled", "numpy")
# Pixels a process decodes with numpy before `auto` loads the kernels: 512 images of 256 x 256, 32 of 1024 x 1024.
COMPILE_AFTER_PIXELS = 1 << 25

_UNSET = object()
_loaded: object = _UNSET  # the compiled module, None (numpy for good), or _UNSET (not decided yet)
_decoded_pixels = 0
_load_lock = threading.Lock()


def mode() -> str:
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {wanted!r}")
    return wanted


def for_pixels(count: int) -> ModuleType | None:
    """The kernels to decode `count` more pixels with: the compiled module, or None for numpy (see the module doc)."""
    global _decoded_pixels
    if _loaded is not _UNSET:
        return _loaded  # type: ignore[return-value]
    wanted = mode()
    if wanted == "auto":
        _decoded_pixels += count
        if _decoded_pixels < COMPILE_AFTER_PIXELS:
            return None
    return load()


def current() -> ModuleType | None:
    """The compiled module if it is loaded, else None; loads nothing (the table fills use what the lookups use)."""
    return None if _loaded is _UNSET else _loaded  # type: ignore[return-value]


def load() -> ModuleType | None:
    """Load the compiled kernels now (once per process) unless ``VB_BATCH_CODEC_KERNELS=numpy``; None where
    numpy runs instead."""
    global _loaded
    with _load_lock:
        if _loaded is _UNSET:
            _loaded = None if mode() == "numpy" else _import_compiled()
    return _loaded  # type: ignore[return-value]


def _import_compiled() -> ModuleType | None:
    try:
        import numba

        if numba.config.DISABLE_JIT:
            log.info("codecs: NUMBA_DISABLE_JIT is set; decoding with numpy")
            return None
        from vb_batch.codecs import _compiled
    except Exception as error:  # ImportError, or numba unable to cache/compile here
        log.warning("codecs: compiled kernels unavailable (%s: %s); decoding with numpy", type(error).__name__, error)
        return None
    return _compiled


_per_thread = threading.local()

# A lookup over every pixel (the kernels' `only` argument when no pixels are listed).
EVERY_PIXEL = np.empty(0, np.intp)


class Missed:
    """What a compiled lookup hands back of the pixels without an entry: their indices and their distinct keys.

    `arrays` are the kernel's arguments: a bit per table key (2 MB per thread, which the kernel clears again
    before it returns), room for the keys and the indices, and the two counts the kernel fills in.
    """

    def __init__(self, visited: int) -> None:
        self.seen = getattr(_per_thread, "seen", None)
        if self.seen is None:  # one per thread, left all zeros by every lookup (np.zeros of 2 MB costs ~40 us)
            self.seen = _per_thread.seen = np.zeros(1 << 21, np.uint8)
        self.keys = np.empty(min(visited, 1 << 24), np.int32)
        self.at = np.empty(visited, np.intp)
        self.counts = np.zeros(2, np.intp)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.seen, self.keys, self.at, self.counts

    def pixels(self) -> np.ndarray:
        return self.at[: self.counts[0]]

    def distinct_keys(self) -> np.ndarray:
        return self.keys[: self.counts[1]]


@contextlib.contextmanager
def forced(kernels: str) -> Iterator[None]:
    """Decode with 'compiled' or 'numpy' kernels inside the block (tests and benchmarks compare the two)."""
    global _loaded
    before = _loaded
    if kernels == "numpy":
        _loaded = None
    elif kernels == "compiled":
        _loaded = _import_compiled()
        if _loaded is None:
            _loaded = before
            raise RuntimeError("codecs: the compiled kernels are unavailable here")
    else:
        raise ValueError(f"kernels must be 'compiled' or 'numpy', got {kernels!r}")
    try:
        yield
    finally:
        _loaded = before
