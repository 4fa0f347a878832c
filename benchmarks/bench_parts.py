"""Part files on every engine: how many, how many rows each, and what compaction costs.

    python benchmarks/bench_parts.py                    # 10,000 rows of 32 px, rows_per_file 1024
    python benchmarks/bench_parts.py --rows 2000 --no-write

The same input (row groups of 256 rows) on the local, Ray and Spark engines,
identity model, depth only, default settings. Reported per engine: the
committed files' row counts, the run's seconds, and the seconds its compact
tasks took (Ray and Spark write a short file per task and merge them into
files of `output.rows_per_file` rows; before this, Ray committed ~53-row files).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import write_table  # noqa: E402
from common import argument_parser, machine_info, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--rows-per-file", type=int, default=1024)
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    import vb_batch

    results = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-parts-") as root:
        table = write_table(Path(root) / "in.parquet", args.rows, 32)
        for engine in ("local", "ray", "spark"):
            out = Path(root) / f"out-{engine}"
            cfg = {"input": {"path": str(table)},
                   "output": {"path": str(out), "mode": "overwrite", "report": False, "rows_per_file": args.rows_per_file},
                   "tasks": ["depth"], "model": {"backend": "identity"},
                   "engine": {"kind": engine, **({"master": "local[2]"} if engine == "spark" else {})},
                   "run": {"progress": False}}
            summary = vb_batch.annotate(cfg)
            assert summary.success and summary.rows_ok == args.rows
            sizes = sorted((pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")), reverse=True)
            row = {"engine": engine, "files": len(sizes), "rows_per_file": sizes,
                   "seconds": round(summary.seconds, 2),
                   "compact_seconds": round(summary.phase_seconds.get("compact", 0.0), 2),
                   "write_seconds": round(summary.phase_seconds.get("write", 0.0), 2)}
            results.append(row)
            print(f"  {engine:6s} {row['files']:4d} files {sizes[:3]}...{sizes[-1:]}  {row['seconds']:.1f} s, "
                  f"compact {row['compact_seconds']:.2f} s", flush=True)
    report = {"benchmark": "bench_parts", "machine": machine_info(), "time": time.time(),
              "settings": {"rows": args.rows, "rows_per_file": args.rows_per_file, "side": 32, "group_rows": 256},
              "results": results,
              "note": "2-core machine shared with other work while measured; compact seconds are summed over tasks"}
    if not args.no_write:
        write_result("parts", report)
    return report


if __name__ == "__main__":
    main()
