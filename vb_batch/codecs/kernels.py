"""Compiled loops for the codecs' per-pixel work (`_kernels.c`); numpy code stays the fallback and the reference.

The numpy path of a table lookup makes about eight passes over a chunk of
pixels (the table key from two gathers and an or, the gather of the entries,
the check for new colours, the unpacking); the kernels do it in one pass per
pixel that reads its three bytes, gathers its entry and writes the decoded
values, and segmentation's table fill searches each new colour's few
candidates in one loop instead of a numpy pass per candidate. normals, which
has no table, is computed in one pass per pixel as well (numpy's exp finishes
its confidence, as it does depth's). They compute the same IEEE float32
operations in the same order as the numpy code they replace (built with
``-ffp-contract=off``), so the results are the same bits: tests decode
through both.

The kernels are a C extension of about 300 lines, built when vb_batch is
installed (``setup.py``; it needs a C compiler, and the install goes on
without one). A loaded kernel costs a process nothing measurable in time or
memory, which a JIT would not: numba, tried first, added 141 MB of unique
memory and 0.4-0.7 s to every worker process. ``VB_BATCH_CODEC_KERNELS``
picks: ``auto`` (the default) uses them when built and numpy otherwise,
``compiled`` warns once when they are missing, ``numpy`` never uses them. They
release the GIL, so row threads decode in parallel.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENV_VAR = "VB_BATCH_CODEC_KERNELS"
MODES = ("auto", "compiled", "numpy")

_UNSET = object()
_loaded: object = _UNSET  # the compiled module, None (numpy), or _UNSET (not decided yet)
_load_lock = threading.Lock()


def mode() -> str:
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {wanted!r}")
    return wanted


def active() -> ModuleType | None:
    """The compiled kernels to decode with, or None for numpy (decided once per process, see the module doc)."""
    global _loaded
    if _loaded is _UNSET:
        with _load_lock:
            if _loaded is _UNSET:
                wanted = mode()
                _loaded = None if wanted == "numpy" else _import_compiled(warn=wanted == "compiled")
    return _loaded  # type: ignore[return-value]


def _import_compiled(warn: bool) -> ModuleType | None:
    try:
        # By its full name: the extension module only (a `from vb_batch.codecs import` reads as the package).
        _kernels = importlib.import_module("vb_batch.codecs._kernels")
    except ImportError as error:
        (log.warning if warn else log.debug)(
            "codecs: the compiled kernels are not built (%s); decoding with numpy, the same values, slower. "
            "Reinstall vb_batch where a C compiler is available to build them.", error
        )
        return None
    return _kernels


_per_thread = threading.local()

# A lookup over every pixel (the kernels' `only` argument when no pixels are listed).
EVERY_PIXEL = np.empty(0, np.intp)


class Missed:
    """What a compiled lookup hands back of the pixels without an entry: their indices and their distinct keys.

    `arrays` are the kernel's arguments: a bit per table key (2 MB per thread, which the kernel clears again
    before it returns), room for every distinct key and for the indices of an eighth of the pixels, and the two
    counts the kernel fills in. When more pixels missed (a first image), `pixels` is `EVERY_PIXEL`: looking all
    of them up again costs about what an indexed pass over that many would, without writing their indices.
    """

    def __init__(self, visited: int) -> None:
        self.seen = getattr(_per_thread, "seen", None)
        if self.seen is None:  # one per thread, left all zeros by every lookup (np.zeros of 2 MB costs ~40 us)
            self.seen = _per_thread.seen = np.zeros(1 << 21, np.uint8)
        self.keys = np.empty(min(visited, 1 << 24), np.int32)
        self.at = np.empty(visited // 8 + 1, np.intp)
        self.counts = np.zeros(2, np.intp)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.seen, self.keys, self.at, self.counts

    def pixels(self) -> np.ndarray:
        """The indices of the pixels that missed, or `EVERY_PIXEL` when there was no room for them all."""
        return self.at[: self.counts[0]] if self.counts[0] <= len(self.at) else EVERY_PIXEL

    def distinct_keys(self) -> np.ndarray:
        return self.keys[: self.counts[1]]


def table_lookup(kernel: Callable[..., None], output_dtypes: tuple[Any, ...], *arguments: Any) -> Callable[..., Any]:
    """A `ColourTable.decode` lookup through a compiled kernel: `lookup(pixels, entries, only, outputs)` runs
    `kernel(pixels, only, entries, *arguments, *outputs, *missed)` into new arrays of `output_dtypes` (or the
    given `outputs`) and returns (outputs, the `Missed`). The kernels see outputs as bytes: depth's float32
    outputs take the bits of its entries' words."""

    def lookup(pixels: np.ndarray, entries: np.ndarray, only: np.ndarray, outputs: tuple | None) -> tuple:
        if outputs is None:
            outputs = tuple(np.empty(len(pixels), dtype) for dtype in output_dtypes)
        missed = Missed(len(only) or len(pixels))
        kernel(pixels, only, entries, *arguments, *outputs, *missed.arrays)
        return outputs, missed

    return lookup


@contextlib.contextmanager
def forced(kernels: str) -> Iterator[None]:
    """Decode with 'compiled' or 'numpy' kernels inside the block (tests and benchmarks compare the two)."""
    global _loaded
    before = _loaded
    if kernels == "numpy":
        _loaded = None
    elif kernels == "compiled":
        _loaded = _import_compiled(warn=False)
        if _loaded is None:
            _loaded = before
            raise RuntimeError("codecs: the compiled kernels are not built here")
    else:
        raise ValueError(f"kernels must be 'compiled' or 'numpy', got {kernels!r}")
    try:
        yield
    finally:
        _loaded = before
