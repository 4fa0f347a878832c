"""Per-row work inside a stage: the row threads, and the guard every per-row step ends in.

A stage's per-row CPU work (fetching, decoding, resizing, encoding) runs on a
small pool of threads shared by the process (`map_rows`); Pillow, zlib, OpenCV
and numpy release the GIL. Whatever one row's step raises becomes that row's
`vb_error` cell (`row_error`), never the batch's fault.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from vb_batch.errors import RowError, cpu_count
from vb_batch.timing import current, run_collecting

__all__ = ["ROW_THREADS", "map_rows", "output_error", "row_error"]

# On 2 cores the engine gives the CPU stages one thread; more row threads than cores only contend.
ROW_THREADS = max(1, min(4, cpu_count()))
_row_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it: a forked child makes its own)
_row_pool_lock = threading.Lock()


def map_rows(fn, items: list) -> list:
    """[fn(item) for item in items] on `ROW_THREADS` threads shared by the process, in order.

    `fn` guards its own row (it returns errors, never raises them). Each thread books its
    phases into the caller's collector, so the stage's seconds are summed over threads.
    """
    global _row_pool
    if ROW_THREADS == 1 or len(items) < 2:
        return [fn(item) for item in items]
    with _row_pool_lock:
        if _row_pool is None or _row_pool[0] != os.getpid():
            _row_pool = (os.getpid(), ThreadPoolExecutor(ROW_THREADS, thread_name_prefix="vb-rows"))
        pool = _row_pool[1]
    times = current()
    return list(pool.map(lambda item: run_collecting(times, fn, item), items))


def row_error(exc: BaseException, code: str, context: str = "") -> dict[str, str]:
    """The `vb_error` cell of one row whose step raised `exc`: its own code for a `RowError`, else `code`.

    Every per-row step (fetch, decode, model answer, codec decode, resize, encode)
    ends in this guard, so no exception of one row can stop a job; only faults of
    the job itself (config, output, model load) do.
    """
    if isinstance(exc, RowError):
        return exc.as_cell()
    return {"code": code, "message": f"{context}{type(exc).__name__}: {exc}"}


def output_error(task: str, exc: BaseException) -> dict[str, str]:
    """The `vb_error` cell of a row whose answer for `task` could not be decoded, resized or encoded."""
    return row_error(exc, "output_error", f"{task}: ")
