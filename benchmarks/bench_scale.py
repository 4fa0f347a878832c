"""Scale-out: the same job on one Spark executor vs two, and one Ray node vs two.

    python benchmarks/bench_scale.py                 # spark and ray, 96 rows, a 0.3 s-per-batch model
    python benchmarks/bench_scale.py --engines spark --rows 192

On this 2-core machine the model is a sleep (`SleepModel`: `seconds` per batch of
4, the identity painting after it), so what is measured is how many model calls
the engine keeps in flight, not how many cores the box has: with every executor
(node) busy, two of them should take half the time. Each configuration runs in
a fresh process; the input is one Parquet file in row groups of 8 (12 units).
Spark: `local-cluster[N,1,1024]` (N executor JVMs with one core each, real
Python workers); Ray: `ray.cluster_utils.Cluster` with N nodes of two CPUs
(one for a model actor, one for decode / encode tasks), `engine.actors: N`, the
driver's node at 0 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import write_table  # noqa: E402
from common import RESULTS_DIR, machine_info, write_result  # noqa: E402

HERE = str(Path(__file__).resolve().parent)

CHILD = r"""
import json, sys, time
cfg, engine, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cluster = None
if engine == "ray":
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=2)  # one for the model actor, one for the decode / encode tasks
    cluster.wait_for_nodes()
    cfg["engine"].update(address=cluster.address, actors=workers, cpus_per_actor=1, cpus_per_task=0.5)
else:
    cfg["engine"].update(master=f"local-cluster[{workers},1,1024]",
                         spark_conf={"spark.executorEnv.PYTHONPATH": sys.argv[4], "spark.executor.memory": "1g"})
import vb_batch
vb_batch.annotate({**cfg, "output": {**cfg["output"], "path": cfg["output"]["path"] + "-warm"}})  # start-up, not timed
started = time.perf_counter()
summary = vb_batch.annotate(cfg)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rows_ok": summary.rows_ok, "model_seconds": summary.model_seconds}))
if cluster is not None:
    ray.shutdown(); cluster.shutdown()
"""


def run(engine: str, workers: int, table: Path, out: Path, seconds: float) -> dict[str, Any]:
    cfg = {
        "input": {"path": str(table)},
        "output": {"path": str(out), "mode": "overwrite", "report": False},
        "tasks": ["depth"],
        "model": {"backend": "sleep_model:SleepModel", "batch_size": 4, "options": {"seconds": seconds}},
        "engine": {"kind": engine, "cpu_batch_rows": 8},
        "run": {"progress": False},
    }
    path = os.pathsep.join([HERE, *sys.path])
    env = {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), engine, str(workers), path],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} x{workers} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["spark", "ray"], choices=["spark", "ray"])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=0.3, help="model sleep per batch of 4")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "scale.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-scale-") as root:
        table = write_table(Path(root) / "in.parquet", args.rows, 32, group_rows=8)
        for engine in args.engines:
            timing = {}
            for workers in (1, 2):
                measured = run(engine, workers, table, Path(root) / f"out-{engine}-{workers}", args.seconds)
                assert measured["rows_ok"] == args.rows, measured
                timing[workers] = measured["seconds"]
                print(f"  {engine:6s} x{workers}: {measured['seconds']:.2f} s "
                      f"({args.rows / measured['seconds']:.1f} rows/s)", flush=True)
            results.append({"engine": engine, "rows": args.rows, "model_seconds_per_batch": args.seconds,
                            "one_seconds": round(timing[1], 2), "two_seconds": round(timing[2], 2),
                            "speedup": round(timing[1] / timing[2], 2), "ideal_one_seconds":
                            round(args.rows / 4 * args.seconds, 2)})
            print(f"  {engine}: two vs one {timing[1] / timing[2]:.2f}x (target >= 1.7x)", flush=True)
    report = {"benchmark": "bench_scale", "machine": machine_info(), "time": time.time(), "results": results}
    if not args.no_write:
        write_result("scale", report, args.output)
    return report


if __name__ == "__main__":
    main()
