"""The resume filter at a million committed ids: its cost per batch, against the per-batch `is_in` it replaced.

    python benchmarks/bench_resume.py            # 1M committed ids, batches of 64 rows

Measured side by side in one process: `ResumeFilter.apply` (a set built once per
worker process and run, then one lookup per row), the same filter after being
pickled again (what a new Ray task or Spark broadcast receives: the per-process
set is reused), a filter with nothing committed, and the `pyarrow.compute.is_in`
over all committed ids that the engines ran per batch before (it rebuilds its
hash table on every call).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_result  # noqa: E402

from vb_batch.engines.base import ResumeFilter  # noqa: E402


def per_call(function, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


def first_call(resume: ResumeFilter, batch: pa.RecordBatch) -> float:
    started = time.perf_counter()
    resume.apply(batch)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--done", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    done = pa.array([f"img-{i:08d}" for i in range(args.done)])
    batch = pa.record_batch({"id": pa.array([f"img-{i:08d}" for i in range(2 * args.done, 2 * args.done + args.batch)])})
    resume = ResumeFilter(done, "id", key="bench")
    nothing = ResumeFilter(None, "id", key="nothing")
    started = time.perf_counter()
    resume.apply(batch)
    build = time.perf_counter() - started
    figures = {
        "committed_ids": args.done, "batch_rows": args.batch, "set_build_seconds_once_per_process": round(build, 3),
        "filter_us_per_batch": round(per_call(lambda: resume.apply(batch), 2000) * 1e6, 1),
        "first_batch_us_of_a_filter_unpickled_again": round(first_call(pickle.loads(pickle.dumps(resume)), batch) * 1e6, 1),
        "no_resume_us_per_batch": round(per_call(lambda: nothing.apply(batch), 2000) * 1e6, 2),
        "is_in_ms_per_batch_before": round(per_call(lambda: batch.filter(pc.invert(pc.is_in(batch.column(0), value_set=done))), 20) * 1e3, 1),
    }
    for name, value in figures.items():
        print(f"  {name}: {value}")
    report = {"benchmark": "bench_resume", "machine": machine_info(), "time": time.time(), "results": figures}
    if not args.no_write:
        write_result("resume", report)
    return report


if __name__ == "__main__":
    main()
