"""Rows per second of the local and Ray engines on the same jobs, side by side in one run.

Two workloads, each run on both engines over the same Parquet input:

    identity   the `identity` backend, tasks depth + normals + segmentation: the
               pipeline's own cost (read, PNG decode, codecs, PNG encode, commit)
    marigold   a tiny random Marigold (depth + normals) built here with
               `vb_batch.models.tiny.build_tiny_marigold`: a model-bound job

Ray is started once before the timed runs (its start-up time is reported
apart); each job's time includes everything else, for both engines: opening the
input, loading the model (in the driver for local, in the actor for Ray),
processing and the atomic commit. Marigold also runs on the local engine with
torch on one thread, as it runs in a 1-CPU Ray actor. Each job runs `--repeats` times and the
fastest run counts (all times are kept in the JSON): on a shared machine the
others are noise. On a 2-core machine Ray has one model actor
and one CPU for its decode / encode tasks. The outputs of the two engines are
compared (identity: equal; Marigold: equal but for float rounding).

    python benchmarks/bench_engines.py                   # writes benchmarks/results/engines.json
    python benchmarks/bench_engines.py --identity-rows 256 --marigold-rows 16 --no-write
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, write_input, write_result  # noqa: E402

import vb_batch  # noqa: E402
from vb_batch.io.outputs import read_output  # noqa: E402


def job(workload: str, input_path: Path, output_path: Path, engine: str, model_path: dict[str, str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "input": {"path": str(input_path)},
        "output": {"path": str(output_path), "mode": "overwrite", "report": False},
        "run": {"progress": False},
        "engine": {"kind": engine, "cpu_batch_rows": 32},
    }
    if workload == "identity":
        cfg["tasks"] = ["depth", "normals", "segmentation"]
        cfg["segmentation"] = {"classes": ["road", "car", "person", "sky"]}
        cfg["model"] = {"backend": "identity", "batch_size": 16}
    else:
        cfg["tasks"] = ["depth", "normals"]
        cfg["model"] = {"backend": "marigold", "path": model_path, "batch_size": 8, "device": "auto"}
    return cfg


def same_output(a: Path, b: Path, exact: bool) -> bool:
    left = read_output(str(a)).sort_by("id").drop_columns(["vb_run_id"])
    right = read_output(str(b)).sort_by("id").drop_columns(["vb_run_id"])
    if exact or left.equals(right):
        return left.equals(right)
    for name in ("depth", "normals"):
        for x, y in zip(vb_batch.load_arrays(left, name), vb_batch.load_arrays(right, name)):
            if not np.allclose(x, y, atol=1e-3 if name == "depth" else 1e-2):
                return False
    return left.drop_columns(["depth", "normals", "depth_min_rel", "depth_median_rel", "depth_max_rel"]).equals(
        right.drop_columns(["depth", "normals", "depth_min_rel", "depth_median_rel", "depth_max_rel"])
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--identity-rows", type=int, default=1024)
    parser.add_argument("--identity-side", type=int, default=128)
    parser.add_argument("--marigold-rows", type=int, default=64)
    parser.add_argument("--marigold-side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine and workload; the best counts")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from vb_batch.models.tiny import build_tiny_marigold

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-") as tmp:
        root = Path(tmp)
        model_path = {task: str(build_tiny_marigold(root / "tiny" / task, task=task)) for task in ("depth", "normals")}
        inputs = {
            "identity": write_input(root / "in-identity", args.identity_rows, args.identity_side),
            "marigold": write_input(root / "in-marigold", args.marigold_rows, args.marigold_side),
        }
        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray_init_s = time.perf_counter() - started
        default_threads = torch.get_num_threads()
        for workload, input_path in inputs.items():
            outputs = {}
            # Ray's model actor runs torch on one thread (OMP_NUM_THREADS=1 for a 1-CPU actor); the
            # local engine on torch's default. The model-bound workload runs local both ways.
            variants = [("local", "local", default_threads), ("ray", "ray", default_threads)]
            if workload == "marigold" and default_threads != 1:
                variants.insert(1, ("local-1-thread", "local", 1))
            for label, engine, threads in variants:
                torch.set_num_threads(threads)
                runs = []
                for _ in range(args.repeats):
                    outputs[label] = root / f"out-{workload}-{label}"
                    summary = vb_batch.annotate(job(workload, input_path, outputs[label], engine, model_path))
                    assert summary.success, summary.render()
                    runs.append(summary)
                torch.set_num_threads(default_threads)
                best = min(runs, key=lambda s: s.seconds)
                row = {
                    "workload": workload,
                    "engine": label,
                    "driver_torch_threads": threads,
                    "rows": best.rows_processed,
                    "seconds": round(best.seconds, 3),
                    "rows_per_second": round(best.rows_per_second, 2),
                    "seconds_all_runs": [round(s.seconds, 3) for s in runs],
                }
                results.append(row)
                print(f"  {workload:9s} {label:15s} {row['rows']:6d} rows {row['seconds']:8.2f} s "
                      f"{row['rows_per_second']:9.2f} rows/s", flush=True)
            same = same_output(outputs["local"], outputs["ray"], exact=workload == "identity")
            for row in results[-len(variants):]:
                row["same_output_local_and_ray"] = same
        ray.shutdown()

    report = {
        "benchmark": "benchmarks/bench_engines.py",
        "machine": {**machine_info(), "ray": ray.__version__},
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "no_write"},
            "ray": "one model actor (engine.actors=1, cpus_per_actor=1), cpu_batch_rows=32; Ray start excluded",
        },
        "ray_init_seconds": round(ray_init_s, 2),
        "results": results,
    }
    print()
    print(f"{'workload':10s} {'rows':>6s} {'local rows/s':>13s} {'local, 1 thread':>16s} {'ray rows/s':>11s} "
          f"{'ray/local':>10s}  same output")
    for workload in inputs:
        rate = {r["engine"]: r for r in results if r["workload"] == workload}
        local, on_ray = rate["local"], rate["ray"]
        one_thread = f"{rate['local-1-thread']['rows_per_second']:16.2f}" if "local-1-thread" in rate else f"{'-':>16s}"
        print(f"{workload:10s} {local['rows']:6d} {local['rows_per_second']:13.2f} {one_thread} "
              f"{on_ray['rows_per_second']:11.2f} {on_ray['rows_per_second'] / local['rows_per_second']:10.2f}  "
              f"{local['same_output_local_and_ray']}")
    print(f"(Ray start-up, not counted above: {ray_init_s:.1f} s)")
    if not args.no_write:
        print(f"wrote {write_result('engines', report)}")
    return report


if __name__ == "__main__":
    main()
