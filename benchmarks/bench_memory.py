"""Peak memory against input size: does a job's memory follow its queues, or its input?

    python benchmarks/bench_memory.py                          # local engine, 2k / 20k / 100k rows of 128 px
    python benchmarks/bench_memory.py --rows 2000 20000 --side 256 --engines local ray spark
    python benchmarks/bench_memory.py --rows 8192 --group-rows 8192 --unit-rows 256 2048 8192 --engines spark

Each run is a fresh process (peak RSS is a high-water mark: runs must not share
one) that annotates a Parquet table of `rows` painted depth images with the
`identity` model (so the model costs nothing and the CPU side is measured), at
the default settings. The input is written in row groups of 256 rows, from a
few distinct paintings repeated under unique ids, so writing it needs little
memory whatever its size. Reported per run: peak RSS of the job's process (for
Ray and Spark: the driver), the peak RSS of the whole process tree (shared
pages, e.g. Ray's object store, counted in every process that maps them) and
the peak unique memory (USS) of its largest Python worker (sampled every
0.2 s: Ray's and Spark's workers are separate processes), rows/s, and the ratio of each peak to the smallest input's.
`--group-rows 20000` writes one row group per 20,000 rows: a task's memory must
still follow `engine.unit_rows`, not the row group. `--unit-rows 256 2048 8192`
runs each engine once per `engine.unit_rows` (rows per task): a Spark task must
stream its unit, so its peak must not follow the unit's size. The largest
worker's command line is kept (`worker`: which process it was), and the codecs'
kernels setting (`VB_BATCH_CODEC_KERNELS`) in `settings`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, write_result  # noqa: E402

CHILD = """
import json, os, resource, sys, threading, time
import psutil
import vb_batch
cfg = json.loads(sys.argv[1])
me = psutil.Process()
peaks = {"tree_mb": 0.0, "worker_mb": 0.0, "worker": "", "worker_shm_mb": 0.0}
stop = threading.Event()

def sample():
    # Ray and Spark run the stages in other processes: the whole process tree, and its largest worker.
    while not stop.is_set():
        total = worker = 0.0
        largest = ""
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
            total += rss
            try:
                name = (proc.cmdline() or [""])[0]
            except psutil.Error:
                continue
            # Ray names its workers "ray::<task>"; Spark's are Python processes (pyspark.daemon, workers).
            if proc.pid != me.pid and (name.startswith("ray::") or "python" in name.lower()):
                # Unique memory: pages of Ray's object store or a fork's parent are shared, not the worker's.
                try:
                    uss = proc.memory_full_info().uss / 2**20
                except psutil.Error:
                    continue
                if uss > worker:
                    # The program's base name: a results file must not carry this machine's paths.
                    command = proc.cmdline()[:3]
                    command[:1] = [os.path.basename(command[0])] if command else []
                    worker, largest, process = uss, " ".join(command)[:120], proc
        peaks["tree_mb"] = max(peaks["tree_mb"], total)
        if worker > peaks["worker_mb"]:
            peaks["worker_mb"], peaks["worker"] = worker, largest
            # Of its unique pages, those of shared-memory files (Ray's object store in /dev/shm): pages of
            # objects it wrote that no other process maps any more, reused by the store, not the worker's heap.
            try:
                shm = sum(m.private_clean + m.private_dirty for m in process.memory_maps(grouped=True)
                          if m.path.startswith("/dev/shm") or "plasma" in m.path) / 2**20
            except psutil.Error:
                shm = 0.0
            peaks["worker_shm_mb"] = shm
        stop.wait(0.2)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
started = time.perf_counter()
summary = vb_batch.annotate(cfg)
seconds = time.perf_counter() - started
stop.set()
sampler.join()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds,
                  "tree_peak_mb": peaks["tree_mb"], "worker_peak_mb": peaks["worker_mb"], "worker": peaks["worker"],
                  "worker_shm_mb": peaks["worker_shm_mb"],
                  "rows_ok": summary.rows_ok, "success": summary.success}))
"""


def write_table(path: Path, rows: int, side: int, group_rows: int = 256) -> Path:
    """`rows` rows of id + PNG painting in row groups of `group_rows`, streamed to disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vb_batch.codecs import depth

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        painting = depth.encode((0.5 + rng.uniform(5, 40) * xx + rng.uniform(1, 20) * yy**2).astype(np.float32))
        Image.fromarray(painting).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    schema = pa.schema([pa.field("id", pa.string()), pa.field("image", pa.binary())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group_rows):
            n = min(group_rows, rows - start)
            writer.write_table(pa.table({"id": [f"img-{i:07d}" for i in range(start, start + n)],
                                         "image": [blobs[i % len(blobs)] for i in range(start, start + n)]},
                                        schema=schema), row_group_size=group_rows)
    return path


def run_job(input_path: Path, output: Path, engine: str, unit_rows: int | None = None) -> dict[str, Any]:
    cfg = {
        "input": {"path": str(input_path)},
        "output": {"path": str(output), "mode": "overwrite", "report": False},
        "tasks": ["depth"],
        "model": {"backend": "identity"},
        "engine": {"kind": engine},
        "run": {"progress": False},
    }
    if engine == "spark":
        cfg["engine"]["master"] = "local[2]"
    if unit_rows:
        cfg["engine"]["unit_rows"] = unit_rows
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} job failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--engines", nargs="+", default=["local"], choices=["local", "ray", "spark"])
    parser.add_argument("--group-rows", type=int, default=256, help="rows per row group of the input files")
    parser.add_argument("--unit-rows", type=int, nargs="+", default=[None],
                        help="engine.unit_rows values to run each engine with (default: the engine's default)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "memory.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-memory-") as root:
        for rows in args.rows:
            table = write_table(Path(root) / f"in-{rows}.parquet", rows, args.side, args.group_rows)
            for engine, unit_rows in [(e, u) for e in args.engines for u in args.unit_rows]:
                measured = run_job(table, Path(root) / f"out-{engine}-{rows}", engine, unit_rows)
                assert measured["success"] and measured["rows_ok"] == rows, measured
                row = {"engine": engine, "rows": rows, "side": args.side, "group_rows": args.group_rows,
                       "unit_rows": unit_rows, "worker": measured["worker"],
                       "peak_rss_mb": round(measured["peak_rss_mb"], 1),
                       "tree_peak_mb": round(measured["tree_peak_mb"], 1),
                       "worker_peak_mb": round(measured["worker_peak_mb"], 1),
                       # the largest worker's unique pages at its peak that are object-store (shared memory) pages
                       "worker_peak_shm_mb": round(measured["worker_shm_mb"], 1),
                       "worker_peak_heap_mb": round(measured["worker_peak_mb"] - measured["worker_shm_mb"], 1),
                       "seconds": round(measured["seconds"], 2), "rows_per_second": round(rows / measured["seconds"], 1)}
                results.append(row)
                print(f"  {engine:6s} {rows:7d} rows  unit {unit_rows or '-'}  {row['peak_rss_mb']:8.1f} MB driver  "
                      f"{row['tree_peak_mb']:8.1f} MB all processes  {row['worker_peak_mb']:8.1f} MB largest worker ({row['worker'][:40]}; "
                      f"{row['worker_peak_shm_mb']:.0f} MB of it object store)  "
                      f"{row['rows_per_second']:8.1f} rows/s",
                      flush=True)
    for engine in args.engines:
        runs = [r for r in results if r["engine"] == engine]
        for r in runs:
            r["peak_vs_smallest"] = round(r["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
            r["tree_peak_vs_smallest"] = round(r["tree_peak_mb"] / runs[0]["tree_peak_mb"], 3)
            r["worker_peak_vs_smallest"] = round(r["worker_peak_mb"] / max(runs[0]["worker_peak_mb"], 1e-9), 3)
            heap = max(runs[0]["worker_peak_heap_mb"], 1e-9)
            r["worker_heap_vs_smallest"] = round(r["worker_peak_heap_mb"] / heap, 3)
    report = {"benchmark": "bench_memory", "machine": machine_info(), "time": time.time(),
              "settings": {"side": args.side, "group_rows": args.group_rows, "tasks": ["depth"], "model": "identity",
                           "defaults": True, "codec_kernels": os.environ.get("VB_BATCH_CODEC_KERNELS", "auto")},
              "note": "2-core machine shared with other work while measured: rows/s are indicative, peaks are not",
              "results": results}
    if not args.no_write:
        write_result("memory", report, args.output)
    return report


if __name__ == "__main__":
    main()
