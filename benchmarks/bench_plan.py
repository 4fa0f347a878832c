"""`vb-batch plan --sample 200` against the measured full run on 2,000 images: how close is the estimate?

    python benchmarks/bench_plan.py                    # 2,000 images of 96 x 128, identity backend, 200-row sample
    python benchmarks/bench_plan.py --backend demo --rows 500 --sample 50 --no-write   # the demo generalist (slow on CPU)

Side by side in one process, on the same input and config: `vb_batch.plan(cfg, sample=N)`
(which runs the job on the first N rows into a temporary output and projects its
measured per-image seconds, fixed seconds and bytes per row to the whole input), then
the real run of the whole input (`vb_batch.annotate`, report included, wall seconds).
The figures are the ratios estimate / measured for time and output size.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, publish, write_input  # noqa: E402

import vb_batch  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--backend", default="identity", help="identity (codecs and I/O only) or demo (the shipped generalist)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vb-bench-plan-") as tmp:
        source = write_input(Path(tmp) / "in", args.rows, args.height, args.width, files=4)
        cfg = {
            "input": {"path": str(source)},
            "output": {"path": str(Path(tmp) / "out"), "mode": "overwrite"},
            "tasks": ["depth", "normals"],
            "model": {"backend": args.backend, "device": "cpu"},
            "engine": {"kind": "local"},
            "run": {"progress": False},
        }
        started = time.perf_counter()
        plan = vb_batch.plan(cfg, sample=args.sample)
        plan_seconds = time.perf_counter() - started
        assert plan.ok and plan.estimate is not None, plan.render()
        started = time.perf_counter()
        summary = vb_batch.annotate(cfg)
        run_seconds = time.perf_counter() - started
        written = sum(p.stat().st_size for p in (Path(tmp) / "out").glob("*.parquet"))

    estimate = plan.estimate
    report = {
        "benchmark": "benchmarks/bench_plan.py",
        "machine": machine_info(),
        "note": "2 shared CPU cores, loaded by other jobs while this ran: the two runs saw different loads",
        "settings": {"rows": args.rows, "sample": args.sample, "image": [args.height, args.width],
                     "backend": args.backend, "tasks": cfg["tasks"], "engine": "local"},
        "plan": {**estimate.as_dict(), "plan_wall_seconds": round(plan_seconds, 3)},
        "measured": {"seconds": round(run_seconds, 3), "summary_seconds": round(summary.seconds, 3),
                     "rows_ok": summary.rows_ok, "output_bytes": written,
                     "wall_seconds": summary.wall_seconds},
        "ratio_estimate_to_measured": {
            "seconds": round(estimate.seconds_here / run_seconds, 3),
            "output_bytes": round(estimate.output_bytes / written, 3),
        },
    }
    return publish("plan_estimate", report, print_table, write=not args.no_write)


def print_table(report: dict[str, Any]) -> None:
    plan, measured, ratio = report["plan"], report["measured"], report["ratio_estimate_to_measured"]
    print(f"{'':24}{'estimate':>12}{'measured':>12}{'ratio':>8}")
    print(f"{'seconds, whole input':24}{plan['seconds_here']:>12.1f}{measured['seconds']:>12.1f}{ratio['seconds']:>8.2f}")
    print(f"{'output bytes':24}{plan['output_bytes']:>12.0f}{measured['output_bytes']:>12d}{ratio['output_bytes']:>8.2f}")
    print(f"sample of {plan['sample_rows']}: {plan['seconds_per_image'] * 1000:.2f} ms per image, "
          f"{plan['fixed_seconds']:.2f} s fixed; plan itself took {plan['plan_wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
